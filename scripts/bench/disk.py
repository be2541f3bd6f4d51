#!/usr/bin/env python3
"""What a durable write costs on this disk: a 300-byte write into a file whose blocks are
already written (zeros), then either fdatasync (the device's cache flushed too) or
sync_file_range (written to the device, no cache flush: what sled does for its log), one write
every millisecond, N times each. Prints p50 / p90 / p99 in microseconds.
  DIR (the directory to write in; default ./bench-out, on the filesystem parley's data uses
  when run from the checkout)  N (default 1500)
"""
import ctypes
import ctypes.util
import os
import time

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
WAIT_BEFORE, WRITE, WAIT_AFTER = 1, 2, 4


def sync_range(fd, off, n):
    rc = libc.sync_file_range(fd, ctypes.c_longlong(off), ctypes.c_longlong(n),
                              WAIT_BEFORE | WRITE | WAIT_AFTER)
    if rc != 0:
        raise OSError(ctypes.get_errno(), "sync_file_range")


def measure(fd, n, sync):
    out = []
    buf = b"y" * 300
    for i in range(n):
        time.sleep(0.001)
        t0 = time.perf_counter()
        os.pwrite(fd, buf, i * 300)
        sync(fd, i * 300)
        out.append((time.perf_counter() - t0) * 1e6)
    out.sort()
    return out[n // 2], out[n * 9 // 10], out[n * 99 // 100]


def main():
    d = os.environ.get("DIR", "bench-out")
    n = int(os.environ.get("N", "1500"))
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "disk-probe.tmp")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"\0" * (n * 300 + 4096))
        os.fsync(fd)
        for name, sync in [("write + fdatasync", lambda f, off: os.fdatasync(f)),
                           ("write + sync_file_range", lambda f, off: sync_range(f, off, 300))]:
            p50, p90, p99 = measure(fd, n, sync)
            print(f"{name}: p50 {p50:.0f} us, p90 {p90:.0f}, p99 {p99:.0f} ({n} writes)")
    finally:
        os.close(fd)
        os.unlink(path)


if __name__ == "__main__":
    main()
