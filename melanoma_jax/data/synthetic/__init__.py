"""Synthetic dermoscopy images for the real SIIM-ISIC 2020 metadata: the project's default, offline data.

Every metadata row gets one drawn image: skin of the patient's tone under a dermoscope (dark circular
corners, uneven light, hair) with one lesion. A patient's benign nevi share a "nevus style" (colour, size,
shape, pigment network); a malignant lesion follows the ABCD rule (Asymmetry, irregular Border, several
Colours incl. blue-grey/white/red, larger Diameter) to a degree set by a per-lesion severity, so it is the
"ugly duckling" among that patient's lesions. A per-lesion severity moves a melanoma from "looks like this
patient's nevi" (10% are subtle) to florid; 4.5% of benign lesions are look-alikes (dysplastic nevi, some with
grey-blue regression, blue nevi, red angiomas). So the classes overlap: pixels separate them well (a small
CNN trained from scratch reaches an AUC of about 0.9), not perfectly.

An ugly-duckling set (`generate_dataset(..., ugly_duckling=1.0)`) removes every image-level cue instead: a
patient's nevus style is drawn apart from their skin, benign lesions are the patient's own typical nevi and a
melanoma is a typical nevus in a stranger's style. It looks like some patient's benign mole, only not like this
patient's, so an image-only model is at chance and only within-patient comparison finds it.

A second, structurally different generator (`generate_dataset(..., generator="plain", ugly_duckling=1.0)`,
module `plain`) draws an ugly-duckling set of flat lesions on one skin colour shared by every patient (no
texture, hair, light or dermoscope corners; a nevus style only of colour, darkness, size and outline), so a
design tuned on the default generator can be tested on another.

Everything is a pure function of (seed, patient_id) and (seed, image_name), so the same seed gives the same
bytes in any order, in any process.

Modules, one job each: `seeding` (the random streams), `lesions` (patient styles, lesion parameters),
`render` (pixels and JPEG), `plain` (the plain generator), `generators` (a generator by name), `patients`
(the patient subset, hidden test labels), `contact_sheet`, `manifest` (reuse of a finished folder), `writer`
(`generate_dataset`), `archive` (`write_archive`: small downloads in the ISIC archive's 2019 and 2018 layouts,
for `melanoma_jax.data.isic_archive`) and `__main__` (the command line):

  python -m melanoma_jax.data.synthetic --out DIR --num_patients 200 --image_size 128 --seed 0
  python -m melanoma_jax.data.synthetic --out DOWNLOADS --archive 2019 --num_images 200 --image_size 64
"""
from melanoma_jax.data.synthetic.archive import write_archive
from melanoma_jax.data.synthetic.generators import GENERATORS
from melanoma_jax.data.synthetic.lesions import LesionParams
from melanoma_jax.data.synthetic.lesions import make_lesion_params
from melanoma_jax.data.synthetic.lesions import make_patient_style
from melanoma_jax.data.synthetic.lesions import patient_style
from melanoma_jax.data.synthetic.lesions import PatientStyle
from melanoma_jax.data.synthetic.lesions import SUBTLE_MELANOMA_RATE
from melanoma_jax.data.synthetic.manifest import GENERATOR_VERSION
from melanoma_jax.data.synthetic.manifest import MANIFEST
from melanoma_jax.data.synthetic.patients import default_num_test_patients
from melanoma_jax.data.synthetic.patients import DEFAULT_MIN_MALIGNANT
from melanoma_jax.data.synthetic.patients import DEFAULT_NUM_PATIENTS
from melanoma_jax.data.synthetic.patients import hidden_test_labels
from melanoma_jax.data.synthetic.patients import select_patients
from melanoma_jax.data.synthetic.patients import select_test_patients
from melanoma_jax.data.synthetic.patients import TEST_MALIGNANT_RATE
from melanoma_jax.data.synthetic.plain import plain_style
from melanoma_jax.data.synthetic.plain import render_plain_image
from melanoma_jax.data.synthetic.plain import render_plain_lesion
from melanoma_jax.data.synthetic.render import encode_jpeg
from melanoma_jax.data.synthetic.render import JPEG_QUALITY
from melanoma_jax.data.synthetic.render import render_image
from melanoma_jax.data.synthetic.render import render_lesion
from melanoma_jax.data.synthetic.seeding import stable_rng
from melanoma_jax.data.synthetic.writer import generate_dataset

__all__ = [
    "DEFAULT_MIN_MALIGNANT",
    "DEFAULT_NUM_PATIENTS",
    "GENERATORS",
    "GENERATOR_VERSION",
    "JPEG_QUALITY",
    "LesionParams",
    "MANIFEST",
    "PatientStyle",
    "SUBTLE_MELANOMA_RATE",
    "TEST_MALIGNANT_RATE",
    "default_num_test_patients",
    "encode_jpeg",
    "generate_dataset",
    "hidden_test_labels",
    "make_lesion_params",
    "make_patient_style",
    "patient_style",
    "plain_style",
    "render_image",
    "render_lesion",
    "render_plain_image",
    "render_plain_lesion",
    "select_patients",
    "select_test_patients",
    "stable_rng",
    "write_archive",
]
