"""`make loadtest`: a headless locust run (loadtests/locustfile.py) against a server, starting
`loraplex serve` on the demo model first when no URL is given.

`python -m loraplex.loadtests.locust_run [--url URL] [--users 8] [--spawn-rate 8]
[--duration 30s] [--csv results/loadtest] [--port 0] [--serve-args "FLAGS"] [LOCUST OPTIONS]`

- Without `--url`: starts `loraplex serve FLAGS` (`--serve-args`, default none: the demo model
  and its adapters) on 127.0.0.1 (`--port`, 0: a free one), waits for `/health`, runs locust
  against it, then stops it with SIGTERM. Its log goes to `server.log` next to the CSVs.
- Runs `locust -f loadtests/locustfile.py --headless --host URL -u USERS -r SPAWN_RATE
  -t DURATION --csv CSV` plus every option this command does not know (the locustfile's
  `--trace FILE`, `--popularity`, ..., or locust's own), writing CSV_stats.csv,
  CSV_stats_history.csv, CSV_failures.csv and CSV_exceptions.csv.
- Exit status: locust's (1 when any request failed), or 1 if the server did not start.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
from pathlib import Path

from loraplex.loadtests.server_process import ServerProcess, loraplex_exe

logger = logging.getLogger(__name__)

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loraplex.loadtests.locust_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--url", default=None, help="the server (default: start the demo on loopback)")
    p.add_argument("--users", type=int, default=8, help="concurrent users (closed loop)")
    p.add_argument("--spawn-rate", type=float, default=8.0, help="users started per second")
    p.add_argument("--duration", default="30s", help="run time (locust's -t: 30s, 2m, ...)")
    p.add_argument("--csv", default="results/loadtest", help="CSV prefix (locust's --csv)")
    p.add_argument("--port", type=int, default=0, help="port of the started server (0: free)")
    p.add_argument("--serve-args", default="", help="flags for the started `loraplex serve`")
    return p


def locust_argv(url: str, args: argparse.Namespace, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
        "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.duration,
        "--csv", args.csv, *extra,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not every /health poll
    out_dir = Path(args.csv).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.url:
        return subprocess.call(locust_argv(args.url, args, extra))
    flags = shlex.split(args.serve_args)
    try:
        with ServerProcess(loraplex_exe(), flags, args.port, str(out_dir)) as server:
            logger.info("loraplex serve is up at %s (log: %s)", server.url, server.log_path)
            rc = subprocess.call(locust_argv(server.url, args, extra))
    except SystemExit as e:  # the server did not start: ServerProcess says why
        print(e, file=sys.stderr)
        return 1
    if server.returncode:
        logger.warning("loraplex serve exited with status %d", server.returncode)
    return rc


if __name__ == "__main__":
    sys.exit(main())
