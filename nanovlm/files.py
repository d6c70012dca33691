"""Writing files so a crash never leaves half of one.

Everything is written under a temporary name beside its target and renamed into place once whole. A
rename within one folder is atomic, so a reader, or the next run after a crash, finds the old version or
the new one, never a mix of the two.
"""

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError


def write_file_atomically(path: Path, data: str | bytes | Callable[[Path], object]) -> None:
    """Write text, bytes, or whatever data(tmp_path) writes, to path.tmp, then rename it to path."""
    tmp = path.with_name(path.name + ".tmp")
    if callable(data):
        data(tmp)
    elif isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)


def replace_dir(new: Path, target: Path) -> None:
    """Put folder `new` at `target`, moving an existing target to target.old first (a rename cannot replace a folder).

    Between the two renames only target.old exists: a reader that finds no target may look there.
    """
    old = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def write_dir_atomically(target: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp_dir), then swap tmp_dir into target's place, so target is always whole or absent.

    Made for checkpoints, whose files reach the disk (fsync) before the swap. If writing fails (a full
    disk, say), tmp_dir is deleted and target is left as it was; the OSError says so.
    """
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        for f in tmp.iterdir():  # make sure the bytes are on disk before the rename makes them visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a failed write as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OSError(
            f"could not write checkpoint {target} ({reason}); nothing was lost: {target} is as it was before "
            f"and the partial {tmp.name} was deleted"
        ) from e
    except BaseException:  # an interrupt or a bug: still leave no half-written copy behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target)
