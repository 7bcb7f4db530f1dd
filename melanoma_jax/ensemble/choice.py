"""The out-of-fold choice among a stage's candidates, honest with a few dozen melanomas.

Picking the candidate with the best out-of-fold AUC and reporting that AUC overstates it: with many
candidates and few positives one of them wins by luck. Two guards, both measured in docs/ensemble.md:
  * nested validation: the candidate used for fold k's rows is chosen on inner out-of-fold predictions that
    never saw fold k (fusion.nested_oof), so the stage's reported out-of-fold AUC is that of the whole
    procedure "choose, then fit", not of the luckiest candidate;
  * the one-standard-error rule (`RULES["one_se"]`): among candidates listed simplest first, keep the first
    whose AUC is within one standard error (Hanley and McNeil) of the best, so a more complex design must
    win by more than noise. `RULES["best"]` keeps the best (first listed on a tie).
The model fitted for the test rows and new images is chosen by the same rule on the candidates' outer
out-of-fold AUCs over all training rows.
"""
import numpy as np

from melanoma_jax.evaluation import metrics
from melanoma_jax.utils.errors import InputError

RULES = ("one_se", "best")


def choose(aucs, n_pos, n_neg, rule):
  """The name kept among `aucs` ({name: AUC}, simplest first) by `rule`."""
  if rule not in RULES:
    raise InputError(f"choice rule {rule!r} must be one of {', '.join(RULES)}")
  names = list(aucs)
  best = max(names, key=lambda n: aucs[n])  # First listed on a tie.
  if rule == "best":
    return best
  floor = aucs[best] - metrics.auc_standard_error(aucs[best], n_pos, n_neg)
  return next(n for n in names if aucs[n] >= floor)


def _auc(targets, scores):
  return metrics.roc_auc(targets, scores) if 0 < targets.sum() < len(targets) else 0.5


def nested(outer, inner, targets, fold_ids, rule):
  """(out-of-fold scores [rows], {fold: chosen name}) of choosing among candidates out of fold.

  outer: {name: [rows]} each candidate's outer out-of-fold scores; inner: {name: {fold: [rows]}} its inner
  scores for each outer fold (fusion.nested_oof). Fold k's rows take the outer scores of the candidate the
  rule keeps on the inner scores of the other folds' rows.
  """
  targets, fold_ids = np.asarray(targets), np.asarray(fold_ids)
  names = list(outer)
  scores, chosen = np.full(len(targets), np.nan), {}
  for fold in np.unique(fold_ids):
    rows = fold_ids != fold
    y = targets[rows]
    aucs = {n: _auc(y, inner[n][int(fold)][rows]) for n in names}
    chosen[int(fold)] = choose(aucs, int(y.sum()), int(len(y) - y.sum()), rule)
    scores[~rows] = outer[chosen[int(fold)]][~rows]
  return scores, chosen


def final(outer, targets, rule):
  """(chosen name, {name: outer out-of-fold AUC}) for the model fitted on all rows."""
  targets = np.asarray(targets)
  aucs = {n: _auc(targets, s) for n, s in outer.items()}
  return choose(aucs, int(targets.sum()), int(len(targets) - targets.sum()), rule), aucs
