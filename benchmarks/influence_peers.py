"""conditioner's EK-FAC influence against kronfluence's, on the same model, data and queries.

For each experiment of ``conditioner influence`` (concrete, digits) this trains the model once
(:func:`conditioner.app.attribution.prepare`) and scores the queries against every training
example with

- ``conditioner``: our EK-FAC (exact expectation over the model's predictive distribution, no
  sampled labels), damping = ``--damping-ratio`` × the mean GGN eigenvalue;
- ``kronfluence (sampled, seed s)``: kronfluence's default "true Fisher": the factors use labels
  sampled from the model (categorical for cross-entropy, ``N(f, 1/2)`` targets for the squared
  error, whose Fisher is then the GGN), the same absolute damping (``ScoreArguments.damping_factor``);
- ``kronfluence (sampled, its damping)``: the same factors with ``damping_factor=None``, its
  heuristic 0.1 × the mean of each module's EK-FAC eigenvalues (a per-module damping);
- ``kronfluence (empirical)``: ``use_empirical_fisher=True`` (the true labels);
- ``kronfluence (exact)``: a correctness check. The factor data set holds every (example, class)
  pair with the loss weighted by ``sqrt(C p_k)`` (for the squared error, a target shifted by
  ``1/sqrt(2)`` so that the gradient is the square root of the output Hessian); kronfluence's
  "empirical" factors on it are then the exact expectation that ours compute.
- ``conditioner (empirical)``: our EK-FAC with ``fisher_type="empirical"``, to check against
  kronfluence's empirical factors.

Sign: kronfluence's pairwise score is ``∇f_qᵀ (F + λI)⁻¹ ∇ℓ_m`` with no minus sign (its
convention: with a loss as the measurement, positive = helpful). Our measurement ``f`` is
higher-is-better (margin, negative absolute error) and our score is ``−∇f_qᵀ (B + λI)⁻¹ ∇ℓ_m``, so
kronfluence's scores are NEGATED before any comparison; then positive = helpful for both.

Both libraries are timed on the whole computation from a trained model (factors, eigenbases,
eigenvalue corrections, query and training gradients, scores; kronfluence also writes its factors
and scores to ``--work-dir``), median of ``--timing-repeats`` runs, the libraries alternating.
The LDS uses the retraining of :func:`lds_measurements` (cached: share ``--cache-dir`` with a
``conditioner influence --out DIR`` run, whose cache is ``DIR/lds-cache``, to reuse it).

    python benchmarks/influence_peers.py --subsets 32 --repeats 2 --queries 50
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task as KronTask
from torch import nn
from torch.utils.data import TensorDataset

from conditioner.curvature.kfac import EKFAC
from conditioner.app.attribution import EXPERIMENTS, Prepared, lds_measurements, prepare
from conditioner.influence.lds import linear_datamodeling_score
from conditioner.influence.scores import InfluenceContext, influence, train_batches
from conditioner.influence.task import Task as OurTask


class PeerTask(KronTask):
    """kronfluence's view of one of our experiments: the summed per-example training loss and our
    measurement (margin / negative absolute error, summed over the batch)."""

    def __init__(self, task: OurTask) -> None:
        self.task = task
        self.kind = task.spec.kind  # "mse" or "cross_entropy"

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        if len(batch) == 3:  # the "exact" factor data set: (input, class or output, weight)
            inputs, labels, weights = batch
            outputs = model(inputs)
            if self.kind == "cross_entropy":
                return (weights * F.cross_entropy(outputs, labels, reduction="none")).sum()
            shifted = outputs.detach() - 1.0 / math.sqrt(2.0)  # gradient 2 (f - t) = sqrt(2): √ of the Hessian 2
            return F.mse_loss(outputs, shifted, reduction="sum")
        inputs, targets = batch
        outputs = model(inputs)
        if self.kind == "cross_entropy":
            if sample:
                with torch.no_grad():
                    targets = torch.distributions.Categorical(logits=outputs.detach()).sample()
            return F.cross_entropy(outputs, targets, reduction="sum")
        if sample:
            with torch.no_grad():  # Gaussian likelihood whose Fisher is the GGN of (f - t)²
                targets = torch.normal(outputs.detach(), std=math.sqrt(0.5))
        return F.mse_loss(outputs, targets, reduction="sum")

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        inputs, targets = batch
        rows, row_targets = self.task.spec.rows(model(inputs), targets)
        return self.task.measure_rows(rows, row_targets).sum()


def exact_factor_dataset(prepared: Prepared) -> TensorDataset:
    """Every (example, class k) pair weighted by ``sqrt(C p_k)``: the mean over its ``N C`` rows of
    the weighted per-pair gradient outer products is the exact expectation ``(1/N) Σ_n Σ_k p_nk g g ᵀ``."""
    x = prepared.x_train
    if prepared.experiment.task.spec.kind != "cross_entropy":
        if prepared.y_train.shape[1] != 1:
            raise ValueError("the exact kronfluence check supports one regression output")
        return TensorDataset(x, prepared.y_train, torch.ones(x.shape[0]))
    with torch.no_grad():
        probabilities = prepared.model(x).softmax(1)
    n, classes = probabilities.shape
    inputs = x.repeat_interleave(classes, 0)
    labels = torch.arange(classes).repeat(n)
    weights = (classes * probabilities.reshape(-1)).sqrt()
    return TensorDataset(inputs, labels, weights)


class Kronfluence:
    """One Analyzer per experiment over a deep copy of the trained model."""

    def __init__(self, prepared: Prepared, work_dir: Path, batch_size: int) -> None:
        self.prepared = prepared
        self.task = PeerTask(prepared.experiment.task)
        self.model = prepare_model(copy.deepcopy(prepared.model), self.task)
        self.work_dir = work_dir / prepared.experiment.name
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.analyzer = Analyzer(prepared.experiment.name, self.model, self.task, cpu=True, disable_tqdm=True,
                                 output_dir=str(self.work_dir))
        self.train = TensorDataset(prepared.x_train, prepared.y_train)
        self.queries = TensorDataset(*prepared.queries)
        self.batch_size = batch_size

    def factors(self, name: str, empirical: bool, seed: int, dataset: TensorDataset | None = None) -> None:
        torch.manual_seed(seed)  # kronfluence's label sampling draws from the global generator
        self.analyzer.fit_all_factors(name, dataset if dataset is not None else self.train, per_device_batch_size=self.batch_size,
                                      factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=empirical),
                                      overwrite_output_dir=True)

    def scores(self, factors_name: str, damping: float | None, tag: str = "") -> torch.Tensor:
        name = f"{factors_name}-scores{tag}"
        self.analyzer.compute_pairwise_scores(name, factors_name, self.queries, self.train,
                                              per_device_query_batch_size=len(self.queries),
                                              per_device_train_batch_size=self.batch_size,
                                              score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
        return -self.analyzer.load_pairwise_scores(name)["all_modules"].float()  # NEGATED: see the module docstring

    def timed(self, name: str, empirical: bool, seed: int, damping: float | None) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        self.factors(name, empirical, seed)
        scores = self.scores(name, damping)
        return scores, time.perf_counter() - start

    def trace(self, factors_name: str) -> float:
        """Σ of kronfluence's EK-FAC eigenvalues (its Λ / number of examples) over all modules."""
        lambdas = self.analyzer.load_lambda_matrices(factors_name)
        return float(sum((lambdas["lambda_matrix"][m].double() / lambdas["num_lambda_processed"][m].double()).sum()
                         for m in lambdas["lambda_matrix"]))


def ours(prepared: Prepared, damping: float, batch_size: int, fisher_type: str = "exact") -> tuple[torch.Tensor, float, float]:
    """Our EK-FAC scores, the seconds they took (curvature included) and the EK-FAC trace."""
    data = train_batches(prepared.x_train, prepared.y_train, batch_size)
    curvature = InfluenceContext(prepared.model, prepared.experiment.task, data)
    start = time.perf_counter()
    if fisher_type != "exact":
        names = [layer.name for layer in curvature.layers]
        curvature._cache["ekfac"] = EKFAC(prepared.model, prepared.experiment.task.loss_function, data, modules=names,
                                          fisher_type=fisher_type)
    result = influence(curvature, prepared.queries, method="ekfac", damping=damping)
    seconds = time.perf_counter() - start
    return result.scores, seconds, float(curvature.kronecker("ekfac").trace())


def _ranks(values: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[values.argsort()] = torch.arange(values.numel(), dtype=torch.float64)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over queries of the Spearman correlation of two score rows."""
    values = []
    for x, y in zip(a.double(), b.double()):
        rx, ry = _ranks(x), _ranks(y)
        rx, ry = rx - rx.mean(), ry - ry.mean()
        values.append(float((rx @ ry) / (rx.norm() * ry.norm())))
    return statistics.fmean(values)


def agreement(a: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    return {"spearman": spearman(a, reference),
            "relative_error": float((a.double() - reference.double()).norm() / reference.double().norm())}


def run_experiment(name: str, args: argparse.Namespace) -> dict[str, Any]:
    experiment = EXPERIMENTS[name]
    prepared = prepare(experiment, args.queries, seed=args.seed)
    data = train_batches(prepared.x_train, prepared.y_train, args.batch_size)
    damping = InfluenceContext(prepared.model, experiment.task, data, args.damping_ratio).damping
    print(f"{name}: {prepared.x_train.shape[0]} training examples, {prepared.queries[0].shape[0]} queries, "
          f"damping {damping:.4g} ({args.damping_ratio} × mean GGN eigenvalue)", flush=True)
    peer = Kronfluence(prepared, args.work_dir, args.batch_size)

    # Correctness: the same curvature in both libraries must give the same scores.
    our_empirical, _, our_empirical_trace = ours(prepared, damping, args.batch_size, "empirical")
    peer.factors("empirical", empirical=True, seed=0)
    kf_empirical = peer.scores("empirical", damping)
    peer.factors("exact", empirical=True, seed=0, dataset=exact_factor_dataset(prepared))
    kf_exact = peer.scores("exact", damping)

    # Timing, alternating; the first run of each is also the one scored.
    our_times, kf_times = [], []
    our_scores = kf_scores = None
    our_trace = 0.0
    for _ in range(args.timing_repeats):
        scores, seconds, our_trace = ours(prepared, damping, args.batch_size)
        our_times.append(seconds)
        our_scores = scores if our_scores is None else our_scores
        scores, seconds = peer.timed("sampled-0", empirical=False, seed=0, damping=damping)
        kf_times.append(seconds)
        kf_scores = scores if kf_scores is None else kf_scores
    peer.factors("sampled-1", empirical=False, seed=1)
    kf_seed1 = peer.scores("sampled-1", damping)
    kf_heuristic = peer.scores("sampled-0", None, tag="-heuristic")
    traces = {"conditioner (exact)": our_trace, "conditioner (empirical)": our_empirical_trace,
              "kronfluence (exact)": peer.trace("exact"), "kronfluence (empirical)": peer.trace("empirical"),
              "kronfluence (sampled, seed 0)": peer.trace("sampled-0"), "kronfluence (sampled, seed 1)": peer.trace("sampled-1")}

    rows: dict[str, dict[str, Any]] = {
        "conditioner": {"scores": our_scores, "seconds": statistics.median(our_times), "all_seconds": our_times},
        "kronfluence (sampled, seed 0)": {"scores": kf_scores, "seconds": statistics.median(kf_times), "all_seconds": kf_times},
        "kronfluence (sampled, seed 1)": {"scores": kf_seed1},
        "kronfluence (sampled, its damping)": {"scores": kf_heuristic},
        "kronfluence (empirical)": {"scores": kf_empirical},
        "kronfluence (exact)": {"scores": kf_exact},
        "conditioner (empirical)": {"scores": our_empirical},
    }
    for row in rows.values():
        row["vs_conditioner"] = agreement(row["scores"], our_scores)
    rows["kronfluence (empirical)"]["vs_conditioner_empirical"] = agreement(kf_empirical, our_empirical)
    rows["kronfluence (sampled, seed 1)"]["vs_seed_0"] = agreement(kf_seed1, kf_scores)

    sweep = []
    for seed in range(args.seeds):
        peer.factors("sweep", empirical=False, seed=seed)
        sweep.append({"seed": seed, "trace_ratio": peer.trace("sweep") / our_trace, "scores": peer.scores("sweep", damping)})
    for item in sweep:
        item["spearman_vs_conditioner"] = spearman(item["scores"], our_scores)
        item["spearman_vs_seed_0"] = spearman(item["scores"], sweep[0]["scores"]) if item["seed"] else 1.0

    lds_start = time.perf_counter()
    masks, measurements = lds_measurements(prepared, args.subsets, args.fraction, args.repeats, args.cache_dir, args.seed,
                                           progress=None)
    lds_seconds = time.perf_counter() - lds_start
    for row in rows.values():
        result = linear_datamodeling_score(row.pop("scores"), masks, measurements)
        row["lds"] = result.mean
        row["lds_per_query"] = result.per_query.tolist()
    for item in sweep:
        item["lds"] = linear_datamodeling_score(item.pop("scores"), masks, measurements).mean
    return {"damping": damping, "train_examples": int(prepared.x_train.shape[0]), "queries": int(prepared.queries[0].shape[0]),
            "train_seconds": prepared.train_seconds, "lds_retraining_seconds (cached if small)": lds_seconds,
            "ekfac_trace": traces,
            "trace_ratio_kronfluence_sampled_to_conditioner": traces["kronfluence (sampled, seed 0)"] / our_trace,
            "rows": rows, "seed_sweep": sweep}


def table(name: str, report: dict[str, Any]) -> str:
    lines = [(f"{name} (damping {report['damping']:.4g}; EK-FAC trace ratio kronfluence sampled / ours "
              f"{report['trace_ratio_kronfluence_sampled_to_conditioner']:.3f})"),
             f"  {'setting':36s} {'LDS':>7s} {'time (s)':>9s} {'Spearman':>9s} {'rel. err':>9s}"]
    for setting, row in report["rows"].items():
        seconds = f"{row['seconds']:9.2f}" if "seconds" in row else f"{'':9s}"
        agree = row["vs_conditioner"]
        lines.append(f"  {setting:36s} {row['lds']:7.3f} {seconds} {agree['spearman']:9.4f} {agree['relative_error']:9.3g}")
    extra = report["rows"]["kronfluence (empirical)"]["vs_conditioner_empirical"]
    seeds = report["rows"]["kronfluence (sampled, seed 1)"]["vs_seed_0"]
    lines.append(f"  kronfluence (empirical) vs conditioner (empirical): Spearman {extra['spearman']:.4f}, rel. err {extra['relative_error']:.3g}")
    lines.append(f"  kronfluence sampled seed 1 vs seed 0: Spearman {seeds['spearman']:.4f}, rel. err {seeds['relative_error']:.3g}")
    sweep = report["seed_sweep"]
    if sweep:
        ratios = [item["trace_ratio"] for item in sweep]
        lines.append(f"  kronfluence sampled over {len(sweep)} seeds: trace ratio to ours median {statistics.median(ratios):.3f} "
                     f"(min {min(ratios):.3f}, max {max(ratios):.3f}); LDS median {statistics.median(i['lds'] for i in sweep):.3f} "
                     f"(min {min(i['lds'] for i in sweep):.3f}, max {max(i['lds'] for i in sweep):.3f}); Spearman vs ours median "
                     f"{statistics.median(i['spearman_vs_conditioner'] for i in sweep):.3f}; vs seed 0 median "
                     f"{statistics.median(i['spearman_vs_seed_0'] for i in sweep[1:]) if len(sweep) > 1 else float('nan'):.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiments", nargs="+", choices=sorted(EXPERIMENTS), default=list(EXPERIMENTS))
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--subsets", type=int, default=32, help="LDS subsets M")
    parser.add_argument("--fraction", type=float, default=0.5, help="LDS subset fraction α")
    parser.add_argument("--repeats", type=int, default=2, help="models retrained per subset R")
    parser.add_argument("--damping-ratio", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=10, help="label-sampling seeds of kronfluence's factors to sweep")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/influence-record/lds-cache"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/influence-peers-kronfluence"))
    parser.add_argument("--out", type=Path, default=Path("docs/bench/influence/peers.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    report: dict[str, Any] = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                              "torch": torch.__version__, "experiments": {}}
    for name in args.experiments:
        report["experiments"][name] = run_experiment(name, args)
        print(table(name, report["experiments"][name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
