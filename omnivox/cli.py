"""`omnivox info | speak | bench | make-checkpoint | serve | loadtest | capacity`: parse arguments, call the
library, print."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from omnivox.engine.system_prompts import DEFAULT_PRESET, SYSTEM_PROMPTS, resolve_system_prompt
from omnivox.errors import OmnivoxError

console = Console()
RANDOM_WEIGHTS_NOTE = (
    "[yellow]note:[/] the weights are random (embedded tiny model or --dummy-weights): the reply text is forced "
    "and the end of speech is forced after {seconds:.1f} s, so timings are real but the audio is not speech."
)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="MiniCPM-o 2.6 snapshot directory or hub id (default: embedded tiny random model)")
    p.add_argument("--dummy-weights", action="store_true", help="released full-size config with seeded random weights")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--precision", "--dtype", dest="dtype", default=None, help="bf16 | fp16 | fp32 | tf32")
    p.add_argument(
        "--path",
        default="fast",
        choices=["fast", "reference"],
        help="fast: batched steps over static cache rows, CUDA graphs on a GPU; reference: the same loop with eager "
        "steps one row at a time (the oracle)",
    )
    p.add_argument(
        "--system-prompt",
        default=DEFAULT_PRESET,
        metavar="PRESET_OR_TEXT",
        help=f"the system prompt (voice style): a preset, {', '.join(SYSTEM_PROMPTS)} (no system turn), or the "
        f"prompt's own text (default {DEFAULT_PRESET}: the official revision this project's equivalence tests use)",
    )
    p.add_argument(
        "--attention",
        default="auto",
        choices=["auto", "products", "sdpa", "efficient", "math", "cudnn"],
        help="attention kernels; auto = products on a GPU (queries of up to 16 rows per kv head by two matrix "
        "products, longer ones by SDPA), "
        "sdpa on a CPU; sdpa = memory-efficient with math fallback on a GPU; cudnn only when asked (not "
        "deterministic run to run in bf16); flash is not offered (it takes no mask)",
    )
    p.add_argument(
        "--no-early-first-chunk",
        action="store_true",
        help="release the first audio only after the second TTS call (the official framing)",
    )
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the fast path's steps eagerly on a GPU")
    p.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="torch.compile of the decoder layers on the fast path: auto = on a GPU (about 40 s once at start-up, "
        "then faster steps), off on a CPU",
    )
    p.add_argument(
        "--max-streams",
        "--max-concurrent-requests",
        dest="max_streams",
        type=int,
        default=0,
        help="stream slots (requests served at once; more get 429): 0 = as many as free GPU memory holds, at most "
        "256 (8 on a CPU)",
    )
    p.add_argument("--max-sessions", type=int, default=8, help="conversations kept open between turns")
    p.add_argument("--max-session-tokens", type=int, default=4096, help="LLM positions per conversation")
    p.add_argument("--llm-lookahead", type=int, default=8, help="LLM chunks a reply may make ahead of its speech")


def add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scale-out on Ray Serve (pip install 'omnivox[ray]'; README: Scale-out)")
    g.add_argument("--ray", action="store_true", help="serve through Ray Serve replicas, one engine each")
    scale = g.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="fixed number of replicas (default 1)")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale between MIN and MAX replicas on ongoing "
                       "requests (target 0.7 x --max-concurrent-requests per replica)")
    g.add_argument("--ray-address", default=None, help="join this Ray cluster (auto: the local `ray start` one; "
                   "default: start a local Ray instance)")
    g.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs reserved per replica")
    g.add_argument("--max-queued-requests", type=int, default=None,
                   help="requests queued per Ray proxy when every slot is taken; more get 429 (default: the slots "
                   "of one replica)")
    g.add_argument("--replica-metrics-port", type=int, default=0,
                   help="each replica's own Prometheus port (0: any free port, GET /replica says which)")
    g.add_argument("--torch-threads", type=int, default=None, help="PyTorch threads per replica (CPU replicas)")


def engine_config(args: argparse.Namespace):
    from omnivox.engine.engine import EngineConfig

    return EngineConfig(
        path=args.path,
        system_prompt=resolve_system_prompt(args.system_prompt),
        attention=args.attention,
        early_first_chunk=not args.no_early_first_chunk,
        cuda_graphs=not args.no_cuda_graphs,
        compile=args.compile,
        max_concurrent_requests=args.max_streams,
        max_sessions=args.max_sessions,
        max_session_tokens=args.max_session_tokens,
        llm_lookahead=args.llm_lookahead,
    )


def load_engine(args: argparse.Namespace):
    from omnivox.engine.engine import Engine

    with console.status("loading model"):
        return Engine.from_pretrained(
            args.model,
            device=args.device,
            dtype=args.dtype,
            dummy_weights=args.dummy_weights,
            config=engine_config(args),
            progress=True,
        )


def random_weights(args: argparse.Namespace) -> bool:
    return args.dummy_weights or args.model is None


def cmd_info(args: argparse.Namespace) -> int:
    engine = load_engine(args)
    model = engine.model
    console.print(f"[bold]model:[/] {model.source}")
    table = Table(title="speech path components")
    table.add_column("component")
    table.add_column("parameters", justify="right")
    for name, count in model.param_counts().items():
        table.add_row(name, f"{count:,}")
    console.print(table)
    cfg = model.config
    console.print(
        f"LLM {cfg.llm.num_hidden_layers} layers x {cfg.llm.hidden_size} (GQA {cfg.llm.num_attention_heads}/"
        f"{cfg.llm.num_key_value_heads}), TTS {cfg.tts.num_hidden_layers} layers x {cfg.tts.hidden_size}; "
        f"device {engine.device}, dtype {model.dtype}; weights in memory {model.memory_bytes() / 1e9:.3f} GB; "
        f"loaded in {engine.model_load_s:.2f} s"
    )
    if random_weights(args):
        console.print("[yellow]note:[/] these weights are random: use --model with a MiniCPM-o 2.6 snapshot for speech")
    return 0


def stage_table(metrics) -> Table:
    table = Table(title="stages (seconds)")
    for col in ("stage", "seconds", "per step"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    per_step = {"llm": metrics.llm_tokens, "tts": metrics.tts_steps}
    for name, value in metrics.stages.items():
        steps = per_step.get(name)
        table.add_row(name, f"{value:.4f}", f"{1000 * value / steps:.2f} ms x {steps}" if steps else "")
    table.add_row("TTFB", f"{metrics.ttfb_s:.4f}", "")
    table.add_row("total", f"{metrics.total_s:.4f}", "")
    table.add_row("audio", f"{metrics.audio_s:.3f}", f"RTF {metrics.rtf:.3f}")
    return table


@contextlib.contextmanager
def maybe_trace(path: str | None):
    if path is None:
        yield
        return
    import torch

    with torch.profiler.profile(record_shapes=False) as prof:
        yield
    prof.export_chrome_trace(path)
    console.print(f"trace written to {path}")


def cmd_speak(args: argparse.Namespace) -> int:
    import numpy as np

    from omnivox.audio import write_wav
    from omnivox.engine.types import SamplingParams

    engine = load_engine(args)
    forced_reply = forced_seconds = None
    if random_weights(args) and not args.free:
        forced_reply = args.reply or args.text
        forced_seconds = args.audio_seconds or max(len(forced_reply.split()) / 2.5, 1.0)
        console.print(RANDOM_WEIGHTS_NOTE.format(seconds=forced_seconds))
    sampling = SamplingParams(greedy=args.greedy)
    with maybe_trace(args.trace):
        if args.read_aloud:
            stream = engine.read_aloud(
                args.text, seed=args.seed, sampling=sampling, forced_audio_seconds=forced_seconds
            )
        else:
            stream = engine.stream(
                args.text,
                seed=args.seed,
                sampling=sampling,
                forced_reply=forced_reply,
                forced_audio_seconds=forced_seconds,
            )
        pcm = np.concatenate([chunk.pcm for chunk in stream] or [np.zeros(0, np.float32)])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_wav(args.output, pcm, engine.sample_rate)
    console.print(f"[bold]reply:[/] {stream.metrics.reply_text}")
    console.print(stage_table(stream.metrics))
    console.print(f"wrote {args.output} ({len(pcm) / engine.sample_rate:.2f} s at {engine.sample_rate} Hz)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from omnivox.bench.report import aggregate_block, compare_table, summary_table
    from omnivox.bench.results import read_results

    if args.compare:
        a, b = (read_results(p) for p in args.compare)
        console.print(compare_table(a, b, labels=tuple(args.compare)))
        if args.plot:
            from omnivox.bench.plot import plot_distributions

            plot_distributions([a, b], list(args.compare), args.plot)
            console.print(f"plot written to {args.plot}")
        return 0

    from omnivox.bench.harness import run_bench
    from omnivox.bench.report import stage_table as stages
    from omnivox.bench.workloads import load_workload

    items = load_workload(args.workload)
    engine = load_engine(args)
    forced = random_weights(args)
    if forced:
        console.print(RANDOM_WEIGHTS_NOTE.format(seconds=0).split(" after")[0] + " (workload reply / audio_seconds).")
    out = Path(args.out)
    config = {
        "name": args.label or f"{args.path}-{args.dtype or 'default'}",
        "model": args.model or ("dummy" if args.dummy_weights else "embedded-tiny"),
        "device": args.device,
        "dtype": str(engine.model.dtype),
        "path": args.path,
        "attention": args.attention,
        "stream_slots": engine.stream_slots,
        "early_first_chunk": not args.no_early_first_chunk,
        "workload": args.workload or "standard",
        "model_load_s": engine.model_load_s,
    }
    with maybe_trace(args.trace):
        results = run_bench(engine, items, args.trials, out, seed=args.seed, dummy_weights=forced, config=config)
    samples = results["samples"]
    print(aggregate_block(samples))
    console.print(summary_table(samples))
    console.print(stages(samples))
    console.print(f"model load: {engine.model_load_s:.2f} s (once per engine, not in the per-request figures)")
    console.print(f"results: {out / 'results.json'}; one WAV per reply under {out / 'wav'}")
    if args.plot:
        from omnivox.bench.plot import plot_distributions

        plot_distributions([read_results(out / "results.json")], [config["name"]], args.plot)
        console.print(f"plot written to {args.plot}")
    return 0


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    import torch

    from omnivox.models.synthetic import write_checkpoint

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    path = write_checkpoint(args.dir, size=args.size, seed=args.seed, dtype=dtype, progress=True)
    console.print(f"wrote a synthetic MiniCPM-o 2.6 snapshot ({args.size}, seed {args.seed}, random weights) to {path}")
    return 0


def parse_voice_aliases(value: str) -> tuple[str, ...]:
    """--voice-aliases: "openai" (OpenAI's voice names, the server's default), "none", or a comma-separated list."""
    from omnivox.server.protocol import OPENAI_VOICES

    if value == "openai":
        return OPENAI_VOICES
    if value == "none":
        return ()
    return tuple(name.strip() for name in value.split(",") if name.strip())


def cmd_serve(args: argparse.Namespace) -> int:
    if args.ray:
        try:
            from omnivox.deploy.ray_serve import serve_main
        except ImportError as e:
            raise OmnivoxError(f"--ray needs Ray Serve ({e}); install it with: pip install 'omnivox[ray]'") from None
        return serve_main(args)
    from omnivox.server.app import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        dummy_weights=args.dummy_weights,
        engine_config=engine_config(args),
        served_model_name=args.served_model_name,
        max_input_chars=args.max_input_chars,
        max_ws_sessions=args.max_ws_sessions,
        max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout,
        max_connections=args.max_connections,
        shutdown_timeout_s=args.shutdown_timeout,
        voice_aliases=parse_voice_aliases(args.voice_aliases),
    )
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from omnivox.bench.loadtest import loadtest_main

    return loadtest_main(args)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is too few: use 1 or more")
    return value


def _rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of rates, e.g. 0.5,1,2,4") from None
    if not rates or any(not rate > 0 for rate in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive requests per second, got {text!r}")
    return rates


def cmd_capacity(args: argparse.Namespace) -> int:
    from omnivox.bench.capacity_client import default_client_processes, sweep
    from omnivox.bench.capacity_report import capacity_table, headline_text, plot_capacity
    from omnivox.workload import load_workload, split_warmup

    if args.show:  # an earlier (or interrupted) sweep's file: table, headline and plot again, no server needed
        from omnivox.bench.results import read_results

        results = read_results(args.show)
        if results["kind"] != "capacity":
            raise OmnivoxError(f"{args.show} is a {results['kind']} results file; --show needs one from "
                               "`omnivox capacity`")
        if args.plot and results["extra"]["rates"]:
            console.print(f"plot: {plot_capacity(results, args.plot)}")
        console.print(capacity_table(results))
        console.print(f"[bold]{headline_text(results)}[/]")
        return 0
    _, items = split_warmup(load_workload(args.workload))
    if args.rate_seconds:  # for scripts that budget a device call: no server needed
        from omnivox.bench.capacity_client import rate_seconds

        print(f"{rate_seconds(items, args.warmup, args.duration, args.timeout):.1f}")
        return 0
    out = Path(args.out)
    if out.suffix != ".json":
        out = out / "results.json"

    def progress(summary: dict) -> None:
        verdict = "pass" if summary["passed"] else "fail: " + "; ".join(summary["failures"])
        console.print(f"rate {summary['rate']:g}/s: {summary['requests']} requests, {verdict}")

    try:
        results = sweep(args.url, args.sweep, items=items, duration_s=args.duration, warmup_s=args.warmup,
                        endpoint=args.endpoint, seed=args.seed, ttfa_bound_s=args.ttfa_bound / 1000,
                        timeout_s=args.timeout, budget_s=args.budget, out=out, on_rate=progress,
                        client_processes=args.client_processes or default_client_processes())
    except ConnectionError as e:
        raise OmnivoxError(str(e)) from None
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted:[/] the rates that finished are in {out} (`--show` prints them)")
        return 130
    console.print(f"results: {out}")
    if args.plot and results["extra"]["rates"]:
        console.print(f"plot: {plot_capacity(results, args.plot)}")
    console.print(capacity_table(results))
    console.print(f"[bold]{headline_text(results)}[/]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnivox", description="Realtime speech generation for MiniCPM-o 2.6")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="load a model and print its components and parameter counts")
    add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("speak", help="speak the model's reply to TEXT into a WAV file")
    p.add_argument("text")
    p.add_argument("-o", "--output", default="reply.wav")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--greedy", action="store_true", help="argmax for LLM and TTS (reproducible across machines)")
    p.add_argument("--read-aloud", action="store_true", help="speak TEXT itself (TTS only, default voice)")
    p.add_argument("--reply", help="with random weights: the reply to force (default: TEXT)")
    p.add_argument("--audio-seconds", type=float, help="with random weights: where to force the end of speech")
    p.add_argument("--free", action="store_true", help="with random weights: do not force anything")
    p.add_argument("--trace", help="write a torch.profiler Chrome trace to this file")
    add_model_args(p)
    p.set_defaults(func=cmd_speak)

    p = sub.add_parser("bench", help="benchmark a workload (warm-up excluded), or --compare two results files")
    p.add_argument("--workload", help="JSONL workload (default: the standard workload)")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--out", default="out/bench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", help="name of this configuration in results and comparisons")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"))
    p.add_argument("--plot", help="write a PNG of the TTFB and RTF distributions")
    p.add_argument("--trace", help="write a torch.profiler Chrome trace to this file")
    add_model_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("make-checkpoint", help="write seeded random weights in the official snapshot layout")
    p.add_argument("dir")
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.set_defaults(func=cmd_make_checkpoint)

    from omnivox.server.serving import ServerConfig

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP + WebSocket server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=ServerConfig.served_model_name,
                   help="the model id clients send and /v1/models lists (default: %(default)s)")
    p.add_argument("--max-input-chars", type=int, default=4000)
    p.add_argument("--max-ws-sessions", type=int, default=ServerConfig.max_ws_sessions,
                   help="WebSocket chat sessions open at once; each holds a full-length LLM cache (default: "
                   "%(default)s; the engine keeps at least as many sessions, see --max-sessions)")
    p.add_argument("--max-body-bytes", type=int, default=ServerConfig.max_body_bytes,
                   help="largest request body or WebSocket message; larger bodies get 413 (default: %(default)s)")
    p.add_argument("--body-timeout", type=float, default=ServerConfig.body_timeout_s, metavar="SECONDS",
                   help="a request body must keep arriving (each read within this); stalled uploads get 408 "
                   "(default: %(default)s)")
    p.add_argument("--max-connections", type=int, default=ServerConfig.max_connections,
                   help="open connections plus requests in progress; beyond it new requests get 503 (default: "
                   "%(default)s)")
    p.add_argument("--shutdown-timeout", type=float, default=ServerConfig.shutdown_timeout_s, metavar="SECONDS",
                   help="on SIGTERM: stop taking requests, let streams finish for this long, then end the rest with "
                   "an error event (default: %(default)s)")
    p.add_argument("--voice-aliases", default="openai", metavar="openai|none|NAME,NAME",
                   help="other voice names accepted for the default voice (default: OpenAI's alloy, nova, ...)")
    add_model_args(p)
    add_ray_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("loadtest", help="concurrent streaming client against a running server")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rate", type=float, default=None, help="requests per second (default: as fast as admitted)")
    p.add_argument("--endpoint", default="speech", choices=["speech", "chat"])
    p.add_argument("--workload")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--out", default="out/loadtest/results.json")
    p.set_defaults(func=cmd_loadtest)

    p = sub.add_parser("capacity", help="how many realtime streams a running server holds: open-loop rate sweep")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--sweep", "--rates", dest="sweep", type=_rates, default=_rates("0.5,1,2,4,8,16,32"),
                   metavar="RATES", help="comma-separated requests per second, run lowest first (default "
                   "0.5,1,2,4,8,16,32); the sweep stops after two failing rates")
    p.add_argument("--duration", type=float, default=60.0, help="measuring window per rate, seconds (default 60)")
    p.add_argument("--warmup", type=float, default=10.0, help="arrivals before the window, not measured (default 10)")
    p.add_argument("--workload", help="JSONL workload to draw prompts from (default: the standard workload)")
    p.add_argument("--endpoint", default="chat", choices=["chat", "speech", "mix"],
                   help="chat answers the prompt, speech reads the workload reply aloud, mix draws one per request")
    p.add_argument("--seed", type=int, default=0, help="seeds arrivals, prompt draws and request seeds")
    p.add_argument("--ttfa-bound", type=float, default=300.0, help="p95 TTFA a passing rate stays under, ms")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may wait for its next bytes")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole sweep: a rate that might not finish in time is not started")
    p.add_argument("--out", default="out/capacity/results.json", help="results JSON (bench schema, every request)")
    p.add_argument("--client-processes", type=_positive_int, default=None, metavar="N",
                   help="processes that send the requests and listen to the replies, each a share (default: one "
                   "per four cores, at most 8; 1 below 8 cores): one process sent up to 300 ms late at 160-180 streams")
    p.add_argument("--plot", help="write a PNG of p95 TTFA, underruns and streams playing against the rate")
    p.add_argument("--show", metavar="RESULTS.json", help="print (and with --plot draw) an earlier sweep; runs nothing")
    p.add_argument("--rate-seconds", action="store_true",
                   help="print the most seconds one rate takes with these options (warm-up, window, drain) and exit")
    p.set_defaults(func=cmd_capacity)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OmnivoxError as e:
        console.print(f"[red]error:[/] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
