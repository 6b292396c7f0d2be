"""Run the ingestion dataflow with recovery: `python -m dataflows.run RECOVERY_DIR [-i N -a A;B]`.

What `python -m bytewax.run dataflows.flow:flow_from_env() -r DIR -s 1 -b 10` does, except that the
epoch (which is also the snapshot interval) may be shorter than a second, which Bytewax's runner
does not accept. With 1-second epochs a backfill was served one batch per epoch whenever its sink
took a while (a 5 M-event correlation's 103 chunks took 90 s, each done in 0.1 s); with 0.2-second
epochs the same took 22 s. Snapshots stay as cheap (the live sources' offsets) and a restart replays
less.
"""

from __future__ import annotations

import argparse
import gc
import sys
from datetime import timedelta

from bytewax._bytewax import cli_main
from bytewax.recovery import RecoveryConfig

EPOCH_SECONDS = 0.2
# How long a thread holds the GIL while another wants it (CPython's default: 5 ms). The apply thread
# mostly waits for Redis; each time a reply arrives it needs the GIL back from the planning thread,
# and with 5 ms turns Redis sat idle for much of that wait (bench/README.md: 0.5 ms applied 9-12 %
# more events per second in two pairs of alternated runs).
SWITCH_INTERVAL_S = 0.0005
BACKUP_SECONDS = 10  # how long Bytewax keeps superseded snapshots (a cluster's processes resume together)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dataflows.run", description=__doc__.splitlines()[0])
    parser.add_argument("recovery_dir", help="the recovery store (`python -m bytewax.recovery DIR 1` made it)")
    parser.add_argument("-e", "--epoch", type=float, default=EPOCH_SECONDS, help="epoch and snapshot interval, s")
    parser.add_argument("-i", "--process-id", type=int, default=None, help="this process's index in a cluster")
    parser.add_argument("-a", "--addresses", default=None, help="host:port of every process, ';'-separated")
    args = parser.parse_args(argv)
    from dataflows.flow import flow_from_env
    from schemas.settings import DATAFLOW_YOUNG_OBJECTS, tune_gc

    tune_gc(DATAFLOW_YOUNG_OBJECTS)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    flow = flow_from_env()
    gc.freeze()  # what exists once the flow is built (modules, settings, clients) is never scanned again
    cli_main(flow, process_id=args.process_id,
             addresses=args.addresses.split(";") if args.addresses else None,
             epoch_interval=timedelta(seconds=args.epoch),
             recovery_config=RecoveryConfig(args.recovery_dir, timedelta(seconds=BACKUP_SECONDS)))


if __name__ == "__main__":
    main()
