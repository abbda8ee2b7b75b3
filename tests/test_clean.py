"""`lorakit data clean`: real PDF/DOCX/HTML/code/text inputs, exact counts per reason, clean text."""

import json

import pytest

pytest.importorskip("pypdf")
pytest.importorskip("docx")
pytest.importorskip("bs4")
pytest.importorskip("datasketch")
fpdf = pytest.importorskip("fpdf")

from lorakit import LorakitError  # noqa: E402
from lorakit.cli import main  # noqa: E402
from lorakit.data.clean import clean_corpus, garbled_reason, normalize  # noqa: E402

EN = ("Low-rank adaptation freezes the pretrained weights and trains two small matrices per layer, "
      "which makes fine-tuning cheap enough for a single consumer GPU or even a laptop CPU.")
EN2 = ("Checkpoints are written to a temporary folder and renamed into place, so a crash in the middle of "
       "a write never damages the previous checkpoint, and training resumes exactly where it stopped.")
EN3 = ("Packing places several short examples in one row of tokens; position ids restart for each example "
       "and attention never crosses from one example into the next, which keeps the loss unchanged.")
ZH = ("低秩适配冻结预训练模型的权重，只在每一层训练两个小矩阵，因此微调的成本大大降低。"
      "普通的显卡甚至笔记本电脑的处理器也能完成训练任务，这让更多的人可以用自己的数据定制自己的模型，"
      "而且训练好的适配器文件很小，便于分享和部署。")
ZH2 = ("数据清洗是微调之前最重要的一步：先把文档转换成纯文本，再去掉乱码、广告和导航栏之类的干扰内容，"
       "删除空文档和过短的文档，最后去除完全重复和近似重复的段落，这样得到的语料才能训练出可靠的模型，"
       "否则模型会记住大量无用的噪声。")


def _pdf(path, text, encrypt=False):
    pdf = fpdf.FPDF()
    pdf.add_page()
    pdf.set_font("helvetica", size=11)
    pdf.multi_cell(0, 6, text)
    pdf.output(str(path))
    if encrypt:
        from pypdf import PdfReader, PdfWriter

        w = PdfWriter(clone_from=PdfReader(str(path)))
        w.encrypt(user_password="secret", owner_password="owner")
        with open(path, "wb") as f:
            w.write(f)


def _docx(path, paragraphs):
    import docx

    d = docx.Document()
    for p in paragraphs:
        d.add_paragraph(p)
    d.save(str(path))


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "src"
    (src / "web").mkdir(parents=True)
    (src / "code").mkdir()
    _pdf(src / "paper.pdf", "Adapters are small. The update is low-rank: we learn B and A with a rank much smaller than "
                            "the hidden size, so the number of trainable parame-\nters drops by orders of magnitude.")
    _pdf(src / "locked.pdf", EN2, encrypt=True)
    _docx(src / "notes.docx", ["Meeting notes on fine-tuning", EN2])
    (src / "broken.docx").write_bytes((src / "notes.docx").read_bytes()[:300])  # truncated zip
    (src / "web" / "page.html").write_text(
        "<html><head><title>t</title><script>track()</script><style>p{color:red}</style></head><body>"
        "<nav><a href='/'>Home</a> | <a href='/blog'>Blog</a></nav><header>My Site</header>"
        f"<main><h1>Why LoRA</h1><p>{EN}</p><p>Second   paragraph with  spaces.</p></main>"
        "<aside>Related posts</aside><footer>© 2026 Example</footer></body></html>")
    (src / "zh.txt").write_text(ZH, encoding="utf-8")
    (src / "zz-copy.md").write_text(ZH + "\n", encoding="utf-8")  # exact duplicate after normalisation
    (src / "en.txt").write_text(EN3)
    (src / "near.txt").write_text(EN3.replace("in one row of tokens", "in a single row of tokens"))
    (src / "short.txt").write_text("Too short to keep.")
    (src / "empty.txt").write_text("   \n\t\n")
    (src / "garbled.txt").write_text("LoRA trains â€œsmallâ€\x9d matrices Ã©Ã©Ã© that make fine-tuning cheap " * 3)
    (src / "symbols.txt").write_text("#$%^&*@@@@ ~~~~ |||| <<<>>> ^^^^ ==== ++++ " * 5)
    (src / "code" / "lora.py").write_text("def scale(alpha, r):\n    return alpha / r\n\n\n"
                                         "class Adapter:\n    def __init__(self, r):\n        self.r = r\n" * 2)
    (src / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)  # not a supported type: never listed
    (src / "data.jsonl").write_text(json.dumps({"text": ZH2}, ensure_ascii=False) + "\n"
                                    + json.dumps({"text": "tiny"}) + "\n")
    return src


def test_counts_per_reason_and_clean_text(corpus, tmp_path):
    out = tmp_path / "corpus.jsonl"
    report = clean_corpus([str(corpus)], out, min_chars=100, dedup="near")
    # 15 files of supported types (blob.bin is not one); 2 cannot be read; data.jsonl holds 2 documents
    assert report.inputs == 15 and report.documents == 14
    assert dict(report.rejected) == {"empty": 1, "too_short": 2, "garbled": 2, "duplicate": 1, "near_duplicate": 1}
    skipped = dict((s.split("/src/")[-1], r) for s, r in report.skipped_files)
    assert skipped["locked.pdf"] == "encrypted PDF (no empty user password)"
    assert skipped["broken.docx"].startswith("unreadable docx")
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    by_source = {r["source"].split("/src/")[-1]: r for r in rows}
    assert set(by_source) == {"paper.pdf", "notes.docx", "web/page.html", "zh.txt", "en.txt", "code/lora.py", "data.jsonl#0"}
    assert by_source["paper.pdf"]["text"].endswith("so the number of trainable parameters drops by orders of magnitude.")
    assert "\n" not in by_source["paper.pdf"]["text"]  # line breaks inside the paragraph joined
    assert by_source["web/page.html"]["text"] == f"Why LoRA\n\n{EN}\n\nSecond paragraph with spaces."
    assert by_source["notes.docx"]["text"] == f"Meeting notes on fine-tuning\n\n{EN2}"
    assert by_source["zh.txt"]["text"] == ZH and by_source["zh.txt"]["chars"] == len(ZH)
    assert by_source["code/lora.py"]["type"] == "code:python" and "    return alpha / r" in by_source["code/lora.py"]["text"]
    saved = json.loads((tmp_path / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert set(saved) == {"text", "source", "type", "chars"}


def test_dedup_modes_and_chinese_measured_in_characters(corpus, tmp_path):
    exact = clean_corpus([str(corpus)], tmp_path / "e.jsonl", min_chars=100, dedup="exact")
    assert exact.rejected["duplicate"] == 1 and "near_duplicate" not in exact.rejected
    none = clean_corpus([str(corpus)], tmp_path / "n.jsonl", min_chars=100, dedup="none")
    assert "duplicate" not in none.rejected and none.kept == exact.kept + 1
    assert len(ZH) < 200 < len(ZH.encode("utf-8"))  # long enough in bytes, not in characters
    assert clean_corpus([str(corpus / "zh.txt")], tmp_path / "z.jsonl", min_chars=len(ZH)).kept == 1
    assert clean_corpus([str(corpus / "zh.txt")], tmp_path / "z2.jsonl", min_chars=len(ZH) + 1).kept == 0


def test_normalisation_and_garbled_detection():
    assert normalize("Cafe\u0301 \x07bell\r\nnext  line", "text") == "Café bell\nnext line"
    assert normalize("trans-\nformers are\nlarge\n\n\n\nNew para", "pdf") == "transformers are large\n\nNew para"
    assert normalize("x = 1\n\n\n\ny   = 2\t# tab", "code:python") == "x = 1\n\n\n\ny   = 2\t# tab"
    assert garbled_reason("A normal English sentence, with punctuation!") is None
    assert garbled_reason(ZH) is None
    assert garbled_reason("text \ufffd\ufffd broken " * 3) == "replacement characters"
    assert garbled_reason("It’s â€œquotedâ€\x9d " * 5) == "mojibake"
    assert garbled_reason("@@@### $$$ %%% ^^^ &&& ***") == "symbols"


def test_output_is_atomic_and_bad_inputs_are_clear(corpus, tmp_path):
    out = tmp_path / "c.jsonl"
    out.write_text("previous\n")
    with pytest.raises(LorakitError, match="does not exist"):
        clean_corpus([str(tmp_path / "missing")], out)
    with pytest.raises(LorakitError, match="no file matches"):
        clean_corpus([str(tmp_path / "*.nothing")], out)
    assert out.read_text() == "previous\n"  # untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".c.jsonl")]


def test_cli_clean_with_workers_then_train_on_the_corpus(corpus, tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "corpus.jsonl"
    assert main(["data", "clean", str(corpus), "--out", str(out), "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "kept 7" in printed and "rejected near_duplicate: 1" in printed
    report = json.loads((tmp_path / "corpus.jsonl.report.json").read_text())
    assert report["kept"] == 7 and report["rejected"]["garbled"] == 2
    from lorakit.config import run_config_from_dict
    from lorakit.training.loop import train

    cfg = run_config_from_dict({"model": {"name": str(tiny_model_dir)}, "data": {"path": str(out), "max_len": 64, "val_size": 1},
                                "lora": {"r": 4, "alpha": 8}, "train": {"out_dir": str(tmp_path / "run"), "max_steps": 2,
                                                                        "threads": 1}})
    res = train(cfg, show_progress=False, echo=lambda s: None)
    assert res.steps == 2 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_data_convert_split_and_inspect(tmp_path, tiny_model_dir, capsys):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}", "system": "S"}) + "\n" for i in range(20)))
    assert main(["data", "convert", str(src), "--to", "sharegpt", "--out", str(tmp_path / "s.jsonl")]) == 0
    first = json.loads((tmp_path / "s.jsonl").read_text().splitlines()[0])
    assert first == {"conversations": [{"from": "human", "value": "q0"}, {"from": "gpt", "value": "a0"}], "system": "S"}
    assert main(["data", "convert", str(tmp_path / "s.jsonl"), "--to", "alpaca", "--out", str(tmp_path / "b.jsonl")]) == 0
    assert json.loads((tmp_path / "b.jsonl").read_text().splitlines()[0]) == {"instruction": "q0", "input": "", "output": "a0", "system": "S"}
    assert main(["data", "split", str(src), "--val", "0.25", "--out-dir", str(tmp_path / "sp")]) == 0
    train_lines = (tmp_path / "sp" / "a.train.jsonl").read_text().splitlines()
    val_lines = (tmp_path / "sp" / "a.val.jsonl").read_text().splitlines()
    assert len(train_lines) == 15 and len(val_lines) == 5 and not set(train_lines) & set(val_lines)
    capsys.readouterr()
    assert main(["data", "inspect", str(src), "--model", str(tiny_model_dir), "--max-len", "16",
                 "--histogram", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    assert "format: alpaca" in out and "records: 20" in out and "[[a0<|im_end|>]]" in out and "p95=" in out
    assert (tmp_path / "h.png").stat().st_size > 1000
    assert main(["data", "split", str(src), "--val", "2.5"]) == 2
