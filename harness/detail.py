"""Per-method detail metrics from the records: acceptance as a distribution, where the time goes,
and how far a method is from the limit its own measured figures allow.

Everything is computed from ``samples.jsonl`` (via ``harness.report.Runs``) and the manifest's
config; nothing reads a model. Definitions (a "decode step" is a target forward after the prompt's):

- accepted histogram: how many decode steps committed 1, 2, 3, ... tokens (``accepted_per_step``
  without its first entry, the prompt's forward);
- joint acceptance at draft position (or tree depth) k: the share of steps that proposed a k-th
  token and committed positions 1..k; conditional: joint(k) / joint(k-1), the chance position k is
  accepted once 1..k-1 were;
- pooled mean accepted tokens: all decode steps' tokens / all decode steps; per-request: the mean
  of each request's own tokens per step. The two differ when long requests accept more (or less);
- TTFT: generation start to the end of the prompt's forward (``Record.first_token_s``), median;
  per-token latency (TPOT): (wall - TTFT) / (new tokens - 1) per request, its p50 / p90 / p99;
- draft / verify / host time per decode step: draft forwards (a draft model's, and a method's own
  draft heads, EAGLE, Medusa and Chimera, timed by its ``DraftClock`` like a draft model's);
  target forwards after the prompt's; everything else in the wall time: host code. So the step
  cost below counts a head's compute, and efficiency measures only the implementation's overhead;
- the limit: the speedup the measured acceptance allows at the measured forward costs, host
  time ignored. For a chain with a ``gamma`` (Leviathan et al. 2023, eq. 1 with measured costs):
  E(g) / (g * t_draft + t_verify(g)) * t_1, where E(g) = 1 + sum over k <= g of joint(k), t_1 is the
  reference's time per step, t_draft the draft time per drafted token, and t_verify(g) is linear in
  the tokens fed through the two measured points (1 token: t_1; gamma + 1 tokens: this run's verify
  time). Beyond the positions measured, joint(k) decays by the last conditional acceptance. The
  best gamma is the g in 1..``MAX_GAMMA`` maximising it. Any other method (trees, lookups, SPACE):
  tokens per step / (its forward time per step / t_1), the measured step cost;
- whole generations: the speedup is measured over whole generations, whose prompt forward no
  method shortens, so each limit above is turned into a whole-generation one by Amdahl's law with
  the share ``s`` of the reference's forward time spent on its prompt forwards:
  1 / (s + (1 - s) / decode-step limit). Without it, the prompt's forward (a forward, not host
  work) would count against a method as overhead, the more so the more tokens it accepts;
- limit fraction: the measured speedup / the limit at the setting that ran.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
import numpy as np
import pandas as pd

NAN = float("nan")
MAX_GAMMA = 16  # the largest gamma the best-setting search considers
# the detail columns of summary.csv (list and dict values are written there as JSON)
DETAIL_COLUMNS = [
    "accepted_histogram", "acceptance_joint", "acceptance_conditional", "accepted_pooled", "accepted_per_request",
    "ttft_ms", "tpot_ms_p50", "tpot_ms_p90", "tpot_ms_p99", "draft_ms_per_step", "verify_ms_per_step",
    "host_ms_per_step", "limit_speedup", "limit_fraction", "setting_run", "best_setting", "best_setting_limit",
]  # fmt: skip


@dataclass
class StepCosts:
    """Seconds per decode step, summed over the records of one method (prefill excluded)."""

    steps: int  # decode steps (target forwards after the prompt's)
    draft_s: float  # draft-model forwards per step
    verify_s: float  # target forwards per step
    host_s: float  # outside any forward, per step


@dataclass
class Detail:
    """The detail metrics of one method (x task x group); see the module docstring."""

    accepted_histogram: dict[int, int] = field(default_factory=dict)  # tokens committed -> decode steps
    acceptance_joint: list[float] = field(default_factory=list)  # per draft position / tree depth
    acceptance_conditional: list[float] = field(default_factory=list)  # per draft position / tree depth
    accepted_pooled: float = NAN  # tokens per decode step, all steps pooled
    accepted_per_request: float = NAN  # mean over requests of tokens per decode step
    ttft_ms: float = NAN  # median time to first token
    tpot_ms_p50: float = NAN  # per-token latency after the first, percentiles over requests
    tpot_ms_p90: float = NAN
    tpot_ms_p99: float = NAN
    draft_ms_per_step: float = NAN
    verify_ms_per_step: float = NAN
    host_ms_per_step: float = NAN
    limit_speedup: float = NAN  # the speedup the measured acceptance and forward costs allow
    limit_fraction: float = NAN  # measured speedup / limit_speedup
    setting_run: str = ""  # the setting that ran ("gamma=2"), for methods with a gamma
    best_setting: str = ""  # the setting the measured figures imply ("gamma=1")
    best_setting_limit: float = NAN  # the limit at best_setting


def accepted_histogram(g: pd.DataFrame) -> dict[int, int]:
    """Decode steps by tokens committed (the prompt's forward left out)."""
    counts: dict[int, int] = {}
    for steps in g.accepted_per_step:
        for n in steps[1:]:
            counts[int(n)] = counts.get(int(n), 0) + 1
    return dict(sorted(counts.items()))


def acceptance_curves(g: pd.DataFrame) -> tuple[list[float], list[float]]:
    """(joint, conditional) acceptance per draft position / tree depth, pooled over records."""
    width = max((len(p) for p in g.proposed_per_position), default=0)
    proposed, accepted = np.zeros(width), np.zeros(width)
    for p, a in zip(g.proposed_per_position, g.accepted_per_position):
        proposed[: len(p)] += p
        accepted[: len(a)] += a
    joint = [float(a / p) if p else NAN for a, p in zip(accepted, proposed)]
    before = [1.0] + joint[:-1]
    conditional = [j / b if b else NAN for j, b in zip(joint, before)]
    return joint, conditional


def accepted_means(g: pd.DataFrame) -> tuple[float, float]:
    """(pooled, per-request) tokens per decode step; NaN where no record counts its steps."""
    per_request = [sum(s[1:]) / len(s[1:]) for s in g.accepted_per_step if len(s) > 1]
    steps = sum(len(s[1:]) for s in g.accepted_per_step)
    tokens = sum(sum(s[1:]) for s in g.accepted_per_step)
    if not steps:
        return NAN, NAN
    return tokens / steps, float(np.mean(per_request))


def request_latencies_ms(g: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(TTFT, per-token latency) of each request in ms; empty without ``first_token_s``; a request
    of one token has no per-token latency."""
    if "first_token_s" not in g.columns:
        return pd.Series(dtype=float), pd.Series(dtype=float)
    timed = g[g.first_token_s.notna()]
    n = timed.tokens.map(len)
    tpot = ((timed.wall_time_s - timed.first_token_s) / (n - 1))[n > 1]
    return timed.first_token_s.astype(float) * 1000, tpot.astype(float) * 1000


def latencies_ms(g: pd.DataFrame) -> tuple[float, list[float]]:
    """(median TTFT, [p50, p90, p99] of per-token latency) in ms; NaN without ``first_token_s``."""
    ttft, tpot = request_latencies_ms(g)
    if ttft.empty:
        return NAN, [NAN, NAN, NAN]
    if tpot.empty:
        return float(ttft.median()), [NAN, NAN, NAN]
    return float(ttft.median()), [float(np.percentile(tpot, q)) for q in (50, 90, 99)]


def tokens_after_prefill(g: pd.DataFrame) -> int:
    """New tokens committed by decode steps: each record's tokens less those its prompt's forward
    committed (``accepted_per_step``'s first entry; 1 where a record has none). More than one
    where the prompt's forward also verifies a draft (transformers' assisted generation)."""
    first = g.accepted_per_step.map(lambda s: s[0] if isinstance(s, list) and s else 1)
    return int((g.tokens.map(len) - first).clip(lower=0).sum())


def step_costs(g: pd.DataFrame) -> StepCosts:
    """Draft / verify / host seconds per decode step (NaN when a record has no timed prompt forward)."""
    steps = int((g.target_forwards - 1).clip(lower=0).sum())
    if steps == 0 or g.prefill_time_s.isna().any():
        return StepCosts(steps, NAN, NAN, NAN)
    draft = float(g.draft_forward_time_s.sum())
    verify = float((g.forward_time_s - g.draft_forward_time_s - g.prefill_time_s).sum())
    host = float((g.wall_time_s - g.forward_time_s).sum())
    return StepCosts(steps, draft / steps, verify / steps, host / steps)


def prompt_share(reference: pd.DataFrame) -> float:
    """The share of the reference's forward time spent on the prompts' forwards (NaN where untimed)."""
    if reference.empty or reference.prefill_time_s.isna().any():
        return NAN
    total = float(reference.forward_time_s.sum())
    return float(reference.prefill_time_s.sum()) / total if total > 0 else NAN


def with_prompt_forward(decode_limit: float, share: float) -> float:
    """A decode-step limit as a whole-generation limit: every method runs the prompt's forward once,
    as the reference does, so that share of the reference's forward time is not sped up (Amdahl).
    The speedup it bounds is measured over whole generations, prompt included."""
    if not (share == share and decode_limit == decode_limit and decode_limit > 0):
        return decode_limit
    return 1.0 / (share + (1.0 - share) / decode_limit)


def expected_tokens(joint: list[float], conditional: list[float], gamma: int) -> float:
    """E(gamma) = 1 + sum of joint(k) for k <= gamma, joint decaying by the last conditional
    acceptance beyond the positions measured."""
    known = [j for j in joint if j == j]
    if not known:
        return 1.0
    decay = next((c for c in reversed(conditional) if c == c), 0.0)
    total, last = 1.0, 1.0
    for k in range(gamma):
        last = known[k] if k < len(known) else last * decay
        total += last
    return total


@dataclass
class ChainModel:
    """The measured quantities of a draft-and-verify chain that the Leviathan expression needs."""

    joint: list[float]  # joint acceptance per draft position
    conditional: list[float]  # conditional acceptance per draft position
    run_gamma: int  # the gamma that ran
    t1: float  # the reference's seconds per 1-token step
    draft_per_token: float  # draft seconds per drafted token
    verify_run: float  # target seconds per step at run_gamma (run_gamma + 1 tokens fed)

    def verify(self, gamma: int) -> float:
        """Verify seconds for gamma + 1 tokens: linear through (1, t1) and (run_gamma + 1, verify_run)."""
        return self.t1 + (self.verify_run - self.t1) * gamma / self.run_gamma

    def limit(self, gamma: int) -> float:
        cost = gamma * self.draft_per_token + self.verify(gamma)
        return expected_tokens(self.joint, self.conditional, gamma) * self.t1 / cost if cost > 0 else NAN

    def best(self) -> int:
        return max(range(1, MAX_GAMMA + 1), key=self.limit)


def method_setting(manifest: dict, method: str) -> dict:
    """The method's config as the run resolved it (empty when the manifest lacks it)."""
    return ((manifest.get("config") or {}).get("method") or {}).get(method) or {}


def detail(g: pd.DataFrame, reference: pd.DataFrame, speedup: float, manifest: dict) -> Detail:
    """The detail metrics of one method's records ``g``, with the reference's records of the same
    samples and the method's measured speedup."""
    out = Detail(accepted_histogram=accepted_histogram(g))
    out.acceptance_joint, out.acceptance_conditional = acceptance_curves(g)
    out.accepted_pooled, out.accepted_per_request = accepted_means(g)
    out.ttft_ms, (out.tpot_ms_p50, out.tpot_ms_p90, out.tpot_ms_p99) = latencies_ms(g)
    costs = step_costs(g)
    out.draft_ms_per_step, out.verify_ms_per_step, out.host_ms_per_step = (
        costs.draft_s * 1000, costs.verify_s * 1000, costs.host_s * 1000)  # fmt: skip
    ref = step_costs(reference)
    t1 = ref.verify_s  # the reference's target seconds per 1-token step
    tokens = tokens_after_prefill(g) / costs.steps if costs.steps else NAN
    if not (t1 == t1 and t1 > 0 and costs.steps):
        return out
    share = prompt_share(reference)  # the reference's prompt forwards: no limit speeds them up
    setting = method_setting(manifest, str(g.method.iloc[0]))
    gamma = setting.get("gamma")
    if gamma and setting.get("schedule", "constant") == "constant" and out.acceptance_joint:
        chain = ChainModel(out.acceptance_joint, out.acceptance_conditional, int(gamma), t1,
                           costs.draft_s / int(gamma), costs.verify_s)  # fmt: skip
        best = chain.best()
        out.limit_speedup = chain.limit(int(gamma))
        out.setting_run, out.best_setting = f"gamma={gamma}", f"gamma={best}"
        out.best_setting_limit = with_prompt_forward(chain.limit(best), share)
    else:
        step_cost = (costs.draft_s + costs.verify_s) / t1
        out.limit_speedup = tokens / step_cost if step_cost else NAN
    out.limit_speedup = with_prompt_forward(out.limit_speedup, share)
    out.limit_fraction = speedup / out.limit_speedup if out.limit_speedup == out.limit_speedup else NAN
    return out


def as_row(d: Detail) -> dict:
    """The detail as summary columns (``DETAIL_COLUMNS``)."""
    return asdict(d)


def csv_cell(value) -> object:
    """Lists and dicts as JSON for summary.csv; anything else as it is."""
    if isinstance(value, list):
        value = [None if isinstance(v, float) and v != v else v for v in value]  # NaN is not JSON: null
    return json.dumps(value) if isinstance(value, (list, dict)) else value


