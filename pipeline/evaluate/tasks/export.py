"""Write the built-in synthetic VQA test split as a ``vqa:`` task file (Parquet).

The same file serves our ``vqa:FILE`` task (the ``prompt`` column is the bare question, as the
built-in model was trained, so no short-answer instruction is appended) and the lmms-eval bridge
(``docs/lmms-eval.md``), which reads it through ``datasets``' Parquet loader.
"""

from __future__ import annotations

import io
from pathlib import Path


def export_builtin_vqa(path: str | Path, n: int = 1000, seed: int = 0) -> Path:
    """``n`` test-split samples -> Parquet rows: question_id, image (PNG bytes), question, prompt,
    answer, answers, category (the skill)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ...data import synthetic

    rows = []
    for s in synthetic.generate("test", n, seed):
        buf = io.BytesIO()
        s.image.save(buf, format="PNG")
        rows.append({"question_id": s.id, "image": buf.getvalue(), "question": s.question, "prompt": s.question,
                     "answer": s.answer, "answers": [s.answer], "category": s.skill})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(export_builtin_vqa(a.out, a.n, a.seed))
