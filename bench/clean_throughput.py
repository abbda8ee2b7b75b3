"""Throughput of `lorakit data clean` on a generated mixed corpus (not a test).

    .venv/bin/python bench/clean_throughput.py [--docs 10000] [--workers 1 2]

The corpus: plain text (English and Chinese), Markdown, HTML pages with boilerplate, Python
files, PDFs and DOCX files (fewer: they are slow to *generate*), plus exact and near duplicates,
garbled and too-short documents. Prints documents/s and the peak RSS of the cleaning process.
"""

from __future__ import annotations

import argparse
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("adapter rank matrix weight gradient token model training data layer update low frozen base merge "
         "export server batch packing attention loss schedule checkpoint resume memory speed").split()
HANZI = "低秩适配冻结预训练模型权重只在每一层训练两个小矩阵因此微调成本大大降低普通显卡也能完成任务数据清洗去重乱码"


def sentence(rng: random.Random, zh: bool) -> str:
    if zh:
        return "".join(rng.choice(HANZI) for _ in range(rng.randint(20, 40))) + "。"
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))).capitalize() + "."


def body(rng: random.Random, zh: bool = False) -> str:
    return "\n\n".join(" ".join(sentence(rng, zh) for _ in range(rng.randint(2, 5))) for _ in range(rng.randint(2, 5)))


def make_corpus(root: Path, n: int, seed: int = 0) -> None:
    import docx
    import fpdf

    rng = random.Random(seed)
    texts: list[str] = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.02 and i % 2 == 0:
            pdf = fpdf.FPDF()
            pdf.add_page()
            pdf.set_font("helvetica", size=10)
            pdf.multi_cell(0, 5, body(rng))
            pdf.output(str(root / f"d{i}.pdf"))
        elif kind < 0.04:
            d = docx.Document()
            for para in body(rng).split("\n\n"):
                d.add_paragraph(para)
            d.save(str(root / f"d{i}.docx"))
        elif kind < 0.20:
            (root / f"d{i}.html").write_text(f"<html><body><nav>Home | Blog</nav><main><h1>Title {i}</h1>"
                                             + "".join(f"<p>{p}</p>" for p in body(rng).split("\n\n"))
                                             + "</main><footer>© 2026</footer></body></html>")
        elif kind < 0.28:
            (root / f"d{i}.py").write_text("\n".join(f"def f{i}_{k}(x):\n    return x * {k}\n" for k in range(rng.randint(3, 9))))
        elif kind < 0.36:
            (root / f"d{i}.md").write_text(f"# Note {i}\n\n" + body(rng))
        elif kind < 0.40 and texts:
            (root / f"d{i}.txt").write_text(rng.choice(texts))  # exact duplicate
        elif kind < 0.44 and texts:
            (root / f"d{i}.txt").write_text(rng.choice(texts) + " " + rng.choice(WORDS))  # near duplicate
        elif kind < 0.46:
            (root / f"d{i}.txt").write_text("Ã©â€œ broken â€\x9d text " * 20)  # garbled
        elif kind < 0.48:
            (root / f"d{i}.txt").write_text("short")
        else:
            t = body(rng, zh=rng.random() < 0.3)
            texts.append(t)
            (root / f"d{i}.txt").write_text(t, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=10_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "corpus"
        root.mkdir()
        t = time.perf_counter()
        make_corpus(root, args.docs)
        print(f"generated {args.docs} documents in {time.perf_counter() - t:.0f}s")
        print("| workers | documents | kept | seconds | documents/s | peak RSS (MiB) |")
        print("|---|---|---|---|---|---|")
        for w in args.workers:
            code = ("import json, resource, sys; from lorakit.data.clean import clean_corpus; "
                    f"r = clean_corpus([{str(root)!r}], {str(Path(tmp) / 'out.jsonl')!r}, workers={w}); "
                    "peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
                    "print(json.dumps({**r.to_dict(), 'peak_mib': peak / 1024}))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            import json

            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {w} | {r['documents']} | {r['kept']} | {r['seconds']:.1f} | {r['documents_per_s']:.0f} | {r['peak_mib']:.0f} |")
            print(f"  rejected: {r['rejected']}", file=sys.stderr)


if __name__ == "__main__":
    main()
