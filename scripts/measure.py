"""Run a depthc command as a child process and measure it: wall time and
peak RSS (``os.wait4``'s ``ru_maxrss``), its stdout and stderr kept in log
files. Shared by scripts/scale_check.py, scripts/compile_7b.py and
benches/peak_rss.py (standard library only)."""

import os
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_step(name, argv, logdir):
    """Run argv as a child; return a result dict with rc, wall, peak RSS bytes, output paths."""
    out_path = os.path.join(logdir, name + ".stdout")
    err_path = os.path.join(logdir, name + ".stderr")
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(argv)}", flush=True)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.monotonic() - t0
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc  # reaped by wait4; keep Popen from waiting again
    res = {"step": name, "rc": rc, "wall": wall, "rss": ru.ru_maxrss * 1024,
           "stdout": out_path, "stderr": err_path}
    print(f"    exit {rc}, {wall:.1f} s, peak RSS {res['rss'] / 2**30:.2f} GiB", flush=True)
    return res


def read(path, limit=20000):
    with open(path, "rb") as f:
        data = f.read()
    text = data.decode("utf-8", "replace")
    return text if len(text) <= limit else "...\n" + text[-limit:]
