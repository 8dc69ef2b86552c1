"""`make bench`: every benchmark in one run, then plots and BENCHMARKS.md.

    python -m bench.run_all [--quick] [--only roofline,decode,pc,http,memory,profiles] [--report-only]

Order: the roofline first and the GPT-2 decode right after it, so the bound and the decode rate
it is compared with are measured minutes apart on the same machine state.
"""

import argparse
import os
import sys
import time

from bench.common import machine, set_threads, write_json

SECTIONS = ("roofline", "decode", "pc", "http", "memory", "profiles")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run_all")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness, numbers not meaningful")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--report-only", action="store_true", help="rebuild plots and BENCHMARKS.md from bench/results")
    args = ap.parse_args(argv)
    from bench import report
    if args.report_only:
        print(report.run())
        return 0
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections: {', '.join(sorted(unknown))}")
    set_threads()
    t0 = time.perf_counter()
    meta = {"command": "make bench" if set(only) == set(SECTIONS) and not args.quick
            else "python -m bench.run_all " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine(), "quick": args.quick, "sections": only}
    results = {}
    if "roofline" in only:
        from bench import roofline
        results["roofline"] = roofline.run(args.quick)
        write_json("roofline", results["roofline"])
    if "decode" in only:
        from bench import decode
        results["decode"] = decode.run(args.quick)
        write_json("decode", results["decode"])
        from bench import roofline
        from bench.common import read_json
        roof = results.get("roofline") or read_json("roofline")
        if roof:
            write_json("roofline", roofline.attach_decode(roof, results["decode"]))
    if "pc" in only:
        from bench import pc_cost
        write_json("pc_cost", pc_cost.run(args.quick))
    if "http" in only:
        from bench import http_load
        write_json("http", http_load.run(args.quick))
    if "memory" in only:
        from bench import memory
        write_json("memory", memory.run(args.quick))
    if "profiles" in only:
        from bench import profiles
        write_json("profiles", profiles.run(args.quick))
    meta["total_s"] = time.perf_counter() - t0
    meta["load_end"] = os.getloadavg()
    write_json("meta", meta)
    print(report.run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
