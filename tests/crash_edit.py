"""Run `kdpo-lora` in this process and SIGKILL it at the K-th file-system write call (crash tests).

    CRASH_AT=K python tests/crash_edit.py edit ...   # K = 0: never; counts fsync/rename/replace/save calls
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys

import safetensors.torch

CRASH_AT = int(os.environ.get("CRASH_AT", "0"))
calls = 0


def _counting(fn):
    def wrapper(*args, **kwargs):
        global calls
        calls += 1
        if calls == CRASH_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return wrapper


os.fsync = _counting(os.fsync)
os.replace = _counting(os.replace)
os.rename = _counting(os.rename)
pathlib.Path.rename = _counting(pathlib.Path.rename)
pathlib.Path.write_text = _counting(pathlib.Path.write_text)
safetensors.torch.save_file = _counting(safetensors.torch.save_file)

if __name__ == "__main__":
    # Ctrl-C must raise KeyboardInterrupt here even when the test run itself was started as a
    # background job, whose children inherit SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from kdpo_lora.cli import main

    code = main(sys.argv[1:])
    print(f"write calls: {calls}", file=sys.stderr)
    sys.exit(code)
