"""One command that validates every GPU-only path on a lent H100/H200 and writes a report.

    python -m bench.gpu_check [--report PATH] [--json PATH] [--budget-s 480] [--only a,b] [--skip a,b]
    python -m bench.gpu_check --dry-run --report PATH     # CPU smoke: every step, tiny sizes, interpreter

Steps (``bench/_gpu_steps.py``): environment; labels (Triton vs torch, exact, fp32/bf16/fp16); sampling
(draws equal up to float ties, 1/q weights); plackett_luce (frequencies vs the law); packing
(gather/scatter values and gradients at 80x64x300x4096 bf16, contiguous and permuted, M = 0); overflow
(addresses past 2**31); bandwidth (gather/scatter vs a device-to-device copy, target >= 80%);
select_latency (label + sample at 80x64, target <= 30 us, one Triton launch); attention (which packed
attention path runs); update_comparison (``compare_update --policy openvla_oft --real-size``: needs the
trainer, i.e. verl; skipped with the reason when it does not import); update_probe (verl-free forward +
backward of the 7B policy per mode; runs when the comparison did not pass).

Every step runs in its own process under its own timeout (and the overall ``--budget-s``), records
pass / fail / skip / timeout / crash with the reason, and the report (markdown in bench/RESULTS.md's
format, plus ``--json``) is rewritten after every step, so a failing or hanging step costs its timeout
and nothing else. ``--dry-run`` sets TRITON_INTERPRET=1 (before anything imports pcm_kernels) and hides
CUDA, so CI runs the same code on a CPU. Exit status 0 when no step failed, timed out or crashed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET_S = 480  # the whole command, <= 8 minutes on the GPU
MIN_STEP_S = 15  # a step is not started with less time left in the budget
INJECTABLE = ("fail", "timeout", "crash", "skip")

if "--dry-run" in sys.argv[1:]:  # before any import of pcm_kernels, in this process and its workers
    os.environ["TRITON_INTERPRET"] = "1"


def _steps():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench import _gpu_steps

    return _gpu_steps


# ----------------------------------------------------------------------------------------------------
# worker: one step in this process, its result as JSON

BLOCKED = "hidden by PCM_GPU_CHECK_BLOCK_IMPORTS"


class _HiddenPackages:
    """(tests) Packages named in PCM_GPU_CHECK_BLOCK_IMPORTS import as if they were not installed (a
    machine without verl or peft); ``find_spec`` gives them the origin ``BLOCKED``."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        import importlib.machinery

        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, origin=BLOCKED)
        return None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named '{spec.name}' ({BLOCKED})", name=spec.name)

    def exec_module(self, module):  # pragma: no cover - create_module always raises
        raise ModuleNotFoundError(module.__name__)


def worker(name: str, result_path: str, dry: bool, inject: str | None) -> int:
    started = time.perf_counter()
    out = {"name": name}
    hidden = [n for n in os.environ.get("PCM_GPU_CHECK_BLOCK_IMPORTS", "").split(",") if n]
    if hidden:
        sys.meta_path.insert(0, _HiddenPackages(hidden))
    try:
        if inject == "timeout":
            time.sleep(10**6)
        if inject == "crash":
            os._exit(3)
        if inject == "fail":
            raise AssertionError("injected failure (--inject-step)")
        steps = _steps()
        if inject == "skip":
            raise steps.Skip("injected skip (--inject-step)")
        out.update(steps.run_step(name, dry), status="pass")
    except Exception as err:  # noqa: BLE001 - every outcome is recorded
        steps = sys.modules.get("bench._gpu_steps")
        if steps is not None and isinstance(err, steps.Skip):
            out.update(status="skip", summary=str(err))
        else:
            out.update(getattr(err, "result", None) or {})  # what a failing step found before it failed
            out.update(status="fail", summary=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                       error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-4000:])
    out["seconds"] = time.perf_counter() - started
    Path(result_path).write_text(json.dumps(out, default=str))
    return 0


# ----------------------------------------------------------------------------------------------------
# runner

def _run_worker(name: str, timeout: float, dry: bool, inject: str | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("PCM_KERNELS_BACKEND", None)
    if dry:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "bench.gpu_check", "--worker", name, "--result", result_path]
        cmd += ["--dry-run"] if dry else []
        cmd += ["--inject", inject] if inject else []
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            with_suppress_kill(proc)
            output, _ = proc.communicate()
            timed_out = True
        except BaseException:  # Ctrl-C: the step runs in its own session, so end it too
            with_suppress_kill(proc)
            raise
        elapsed = time.perf_counter() - started
        if timed_out:
            return {"name": name, "status": "timeout", "seconds": elapsed,
                    "summary": f"no result within its {timeout:.0f} s timeout: killed", "log_tail": output[-3000:]}
        if os.path.exists(result_path):
            result = json.loads(Path(result_path).read_text())
            result["seconds"] = elapsed
            result["log_tail"] = output[-3000:]
            return result
        return {"name": name, "status": "crash", "seconds": elapsed,
                "summary": f"the step's process exited with status {proc.returncode} without a result",
                "log_tail": output[-3000:]}


def with_suppress_kill(proc: subprocess.Popen) -> None:
    """Kill the step's process group (the step and anything it started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def plan_steps(args) -> list[tuple[str, float, str | None]]:
    """(name, timeout, injected outcome) in run order: injected test steps first, then the real ones."""
    steps = _steps().STEPS
    names = list(steps)
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            raise SystemExit(f"unknown step(s) {unknown}; steps: {names}")
        names = [n for n in names if n in args.only]
    names = [n for n in names if n not in (args.skip or [])]
    timeouts = dict(args.timeout or [])
    planned = [(name, float(timeouts.get(name, 10 if outcome == "timeout" else 60)), outcome)
               for name, outcome in (args.inject_step or [])]
    for name in names:
        _, gpu_s, dry_s, _ = steps[name]
        planned.append((name, float(timeouts.get(name, dry_s if args.dry_run else gpu_s)), None))
    return planned


def run_all(args) -> tuple[dict, list[dict]]:
    started_at = _dt.datetime.now(_dt.timezone.utc)
    deadline = time.monotonic() + args.budget_s
    results: list[dict] = []
    meta = {"command": "python -m bench.gpu_check " + " ".join(args.argv), "dry_run": args.dry_run,
            "started": started_at.strftime("%Y-%m-%d %H:%M UTC"), "budget_s": args.budget_s}
    environment: dict = {}
    for name, timeout, inject in plan_steps(args):
        left = deadline - time.monotonic()
        if name == "update_probe" and not args.dry_run and any(
                r["name"] == "update_comparison" and r["status"] == "pass" for r in results):
            result = {"name": name, "status": "skip", "seconds": 0.0,
                      "summary": "update_comparison passed: the verl-free probe is its fallback"}
        elif left < min(MIN_STEP_S, timeout):
            result = {"name": name, "status": "skip", "seconds": 0.0,
                      "summary": f"not started: {max(left, 0):.0f} s left of the --budget-s {args.budget_s:.0f} s"}
        else:
            print(f"[gpu_check] {name} (timeout {min(timeout, left):.0f} s) ...", file=sys.stderr, flush=True)
            result = _run_worker(name, min(timeout, left), args.dry_run, inject)
        if name == "environment":
            environment = result.get("figures", {})
        results.append(result)
        print(f"[gpu_check] {name}: {result['status']} ({result['seconds']:.1f} s) {result.get('summary', '')}",
              file=sys.stderr, flush=True)
        meta["elapsed_s"] = args.budget_s - (deadline - time.monotonic())
        meta["environment"] = environment
        write_reports(args, meta, results)
    return meta, results


# ----------------------------------------------------------------------------------------------------
# report

def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_report(meta: dict, results: list[dict]) -> str:
    env = meta.get("environment") or {}
    counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "skip", "timeout", "crash")}
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "transformers") if env.get(k))
    if meta["dry_run"]:
        title = (f"## GPU check dry run: CPU smoke, TRITON_INTERPRET=1, tiny sizes ({meta['started']})\n\n"
                 "Not GPU figures: every step's code ran end to end on the CPU so the command cannot rot.")
    else:
        gpu = env.get("gpu") or "no GPU found"
        title = (f"## GPU: {gpu}{f', {versions}' if versions else ''} ({meta['started']})")
    lines = [title, ""]
    machine = [f"Python {env.get('python')}" if env.get("python") else None,
               f"CUDA {env['torch_cuda']}" if env.get("torch_cuda") else None,
               f"driver {env['driver']}" if env.get("driver") else None,
               f"{env['gpu_memory_gib']} GiB, {env.get('capability')}" if env.get("gpu_memory_gib") else None,
               env.get("machine"),
               "; ".join(f"{k} {'-' if not env.get(k) else env[k]}" for k in ("peft", "verl", "flash_attn"))
               if env else None]
    found = "; ".join(m for m in machine if m)
    lines.append(f"`{meta['command']}`" + (f": {found}." if found else "."))
    lines.append("")
    lines.append(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped, "
                 f"{counts['timeout']} timed out, {counts['crash']} crashed; {meta.get('elapsed_s', 0):.0f} s of a "
                 f"{meta['budget_s']:.0f} s budget.")
    lines += ["", "| step | status | s | result | targets |", "|---|---|---|---|---|"]
    for r in results:
        targets = "; ".join(f"{k} {_fmt(t['value'])} ({t['target']}: {'met' if t['met'] else 'MISSED'})"
                            for k, t in (r.get("targets") or {}).items())
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {_cell(r.get('summary', ''))} | "
                     f"{_cell(targets)} |")
    detailed = [r for r in results if r.get("details") or r.get("error")]
    if detailed:
        lines += ["", "Details:"]
    for r in detailed:
        lines += ["", f"- **{r['name']}** ({r['status']})"]
        lines += [f"  - {_cell(str(d).strip())}" for d in r.get("details", [])]
        if r.get("error"):
            lines += [f"  - error: `{_cell(r['error'].splitlines()[0])[:500]}`"]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_reports(args, meta: dict, results: list[dict]) -> None:
    report = format_report(meta, results)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "steps": results}, indent=1, default=str))


# ----------------------------------------------------------------------------------------------------

def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _timeout(text: str) -> tuple[str, float]:
    name, value = _pair(text)
    return name, float(value)


def _inject(text: str) -> tuple[str, str]:
    name, value = _pair(text)
    if value not in INJECTABLE:
        raise argparse.ArgumentTypeError(f"--inject-step outcome must be one of {INJECTABLE}, got {value!r}")
    return name, value


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", "--cpu-smoke", dest="dry_run", action="store_true",
                    help="every step on the CPU in tiny sizes, kernels under TRITON_INTERPRET=1 (for CI)")
    ap.add_argument("--report", default=None,
                    help="markdown report path (default bench/gpu_check_report.md; the dry run: a temp file)")
    ap.add_argument("--json", default=None, help="also write every step's result as JSON here")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"whole-command budget in s (default {DEFAULT_BUDGET_S}; steps not started past it skip)")
    ap.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=None)
    ap.add_argument("--skip", type=lambda s: [x for x in s.split(",") if x], default=None)
    ap.add_argument("--timeout", type=_timeout, action="append", metavar="STEP=S", help="a step's timeout in s")
    ap.add_argument("--inject-step", type=_inject, action="append", metavar="NAME=OUTCOME",
                    help=f"(tests) run an extra step NAME first that ends in OUTCOME {INJECTABLE}")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--inject", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.budget_s is None:
        args.budget_s = float(DEFAULT_BUDGET_S)
    if args.report is None:
        args.report = (os.path.join(tempfile.gettempdir(), "gpu_check_dry_run.md") if args.dry_run
                       else str(ROOT / "bench" / "gpu_check_report.md"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker, args.result, args.dry_run, args.inject)
    meta, results = run_all(args)
    write_reports(args, meta, results)
    print(format_report(meta, results))
    print(f"[gpu_check] report: {args.report}" + (f", JSON: {args.json}" if args.json else ""), file=sys.stderr)
    return 0 if all(r["status"] in ("pass", "skip") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
