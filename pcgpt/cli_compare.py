"""`pcgpt compare`: checkpoints side by side (pcgpt/model/compare.py computes, this writes files)."""


def register(sub, model_args, env):
    from pcgpt.model.compare_config import CompareConfig
    _D = CompareConfig()
    c = sub.add_parser(
        "compare", help="standard vs PC checkpoints: loss/compute, calibration, uncertainty, OOD, samples",
        description="Runs every MODEL on the held-out 10% of --data (each PC model at each --settle-steps) and "
                    "writes report.md, results.json and PNG plots into --out.\n"
                    f"Defaults: {_D.max_tokens} held-out tokens per (model, T); OOD: {_D.ood_windows} windows of "
                    f"{_D.ood_window} tokens per text;\nsamples: {_D.sample_rows} sequences x {_D.sample_tokens} "
                    "tokens, three runs per model (standard, error-driven, its tau corrected once).\n"
                    "On the two shipped checkpoints these defaults take under a minute of CPU time (one thread; "
                    "docs/pc.md).")
    c.add_argument("models", nargs="+", metavar="MODEL", help="checkpoints (pcgpt directory, nanoGPT ckpt.pt, HF GPT-2 dir)")
    c.add_argument("--data", required=True, help="text file; its last 10%% is the held-out text")
    c.add_argument("--settle-steps", default=",".join(map(str, _D.settle_steps)),
                   help="comma-separated settle-step counts for the PC models (default: %(default)s)")
    c.add_argument("--out", default="compare", help="output directory (default: %(default)s)")
    c.add_argument("--max-tokens", type=int, default=_D.max_tokens, help="held-out tokens per row (default: %(default)s)")
    c.add_argument("--ood-windows", type=int, default=_D.ood_windows, help="windows per OOD text (default: %(default)s)")
    c.add_argument("--ood-window", type=int, default=_D.ood_window, help="tokens per OOD window (default: %(default)s)")
    c.add_argument("--sample-rows", type=int, default=_D.sample_rows, help="sequences per sampler (default: %(default)s)")
    c.add_argument("--sample-tokens", type=int, default=_D.sample_tokens, help="tokens per sequence (default: %(default)s)")
    c.add_argument("--batch-size", type=int, default=_D.batch_size,
                   help="windows per forward pass (default: %(default)s)")
    c.add_argument("--seed", type=int, default=_D.seed,
                   help="seed of the OOD texts' shuffles and of the samples (default: %(default)s)")
    c.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    c.add_argument("--threads", type=int, default=1,
                   help="torch threads on CPU (default: %(default)s: the char models' ops are too small to share "
                        "out, and extra threads only wait on each other on a busy machine; 0 = PyTorch's default)")
    c.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from pathlib import Path
    try:
        import scipy  # noqa: F401  (rank statistics)
    except ImportError:
        raise ValueError("pcgpt compare needs scipy: pip install 'pcgpt[eval]'") from None
    import torch
    from pcgpt.model.checkpoint import load_checkpoint
    from pcgpt.model.compare import CompareConfig, Entry, compare, write_report
    from pcgpt.model.device import resolve_device
    try:
        steps = tuple(int(s) for s in args.settle_steps.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--settle-steps must be comma-separated integers, got {args.settle_steps!r}") from None
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    for flag in ("max_tokens", "ood_windows", "ood_window", "sample_rows", "sample_tokens", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not Path(args.data).is_file():
        raise ValueError(f"--data {args.data}: no such file")
    cfg = CompareConfig(settle_steps=steps, max_tokens=args.max_tokens, ood_window=args.ood_window,
                        ood_windows=args.ood_windows, sample_rows=args.sample_rows, sample_tokens=args.sample_tokens,
                        batch_size=args.batch_size, seed=args.seed)
    device = resolve_device(args.device)
    entries = []
    for path in args.models:
        model, tokenizer, _ = load_checkpoint(path, device=device)
        entries.append(Entry(Path(path).name if Path(path).name not in ("ckpt.pt", "") else str(path), model, tokenizer))
    torch.manual_seed(args.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        result = compare(entries, args.data, cfg)
    finally:  # main() may run in a longer-lived process (the tests)
        torch.set_num_threads(threads)
    report = write_report(result, args.out)
    print(report)
    return 0
