"""Snapshot of a build: ids, image hashes and export rows (images as sha256)."""
import glob
import hashlib
import json
import sys
from pathlib import Path


def sha(b):
    return hashlib.sha256(b).hexdigest()[:16]


def pixels(data: bytes) -> str:
    """Hash of the decoded pixels (independent of the PNG encoder's settings)."""
    import io

    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(data)))
    return sha(f"{a.shape}{a.dtype}".encode() + a.tobytes())


THUMB = 8  # side of the block-mean thumbnail kept beside each hash


def thumb(data: bytes) -> list[float]:
    """The image as THUMB x THUMB block means per channel (0-255, one decimal): what the pixels
    look like, robust to the last-bit float noise another CPU or thread count gives."""
    import io

    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
    h, w = a.shape[0] // THUMB * THUMB, a.shape[1] // THUMB * THUMB
    blocks = a[:h, :w].reshape(THUMB, h // THUMB, THUMB, w // THUMB, 3).mean(axis=(1, 3))
    return [round(float(v), 1) for v in blocks.ravel()]

def records(root, folder):
    out = []
    for f in sorted(glob.glob(f"{root}/{folder}/r*.jsonl")):
        out += [json.loads(line) for line in open(f) if line.strip()]
    return out

def snapshot(root):
    import pyarrow.parquet as pq
    root = Path(root)
    triples = sorted(t["id"] for t in records(root, "triples"))
    pairs, thumbs = {}, {}

    def seen(data: bytes) -> str:
        h = pixels(data)
        thumbs.setdefault(h, thumb(data))
        return h

    for p in records(root, "pairs"):
        pairs[p["id"]] = {k: seen((root / v).read_bytes()) for k, v in p["images"].items()}
    scores = sorted((s["pair_id"], bool(s.get("keep")), s.get("rank")) for s in records(root, "scores"))
    rows = {}
    for f in sorted(glob.glob(f"{root}/export/data/*.parquet")):
        split = Path(f).name.split("-")[0]
        for r in pq.read_table(f).to_pylist():
            for k, v in list(r.items()):
                if isinstance(v, dict) and "bytes" in v:
                    r[k] = None if v["bytes"] is None else seen(v["bytes"])
            rows.setdefault(split, []).append(r)
    return {"triples": triples, "pairs": pairs, "scores": scores, "export": rows,
            "thumbs": thumbs}

if __name__ == "__main__":
    json.dump(snapshot(sys.argv[1]), open(sys.argv[2], "w"), indent=1, sort_keys=True)
