"""`python benchmarks/driver_check.py DATA`: the driver's part of a run's data step as `mmcl run`
does it (a local Ray, then `load_data`: schema, plan columns, first rows, the modality columns
checked by Ray Data tasks). Prints the driver's peak RSS and USS, sampled every 0.2 s, and the
seconds `load_data` took."""
import json
import sys
import threading
import time

import psutil

from pipeline.config import load_config
from pipeline.data import load_data
from pipeline.runtime import init_ray


def main(path: str) -> None:
    me, peak, stop = psutil.Process(), {"rss": 0, "uss": 0}, threading.Event()

    def sample():
        while not stop.wait(0.2):
            m = me.memory_full_info()
            peak["rss"], peak["uss"] = max(peak["rss"], m.rss), max(peak["uss"], m.uss)

    threading.Thread(target=sample, daemon=True).start()
    init_ray(load_config(), verbose=False)
    start = time.time()
    data = load_data(path)
    stop.set()
    print(json.dumps({"path": path, "rows": data.table.num_rows, "seconds": round(time.time() - start),
                      "driver_rss_gib": round(peak["rss"] / 2**30, 2), "driver_uss_gib": round(peak["uss"] / 2**30, 2)}))


if __name__ == "__main__":
    main(sys.argv[1])
