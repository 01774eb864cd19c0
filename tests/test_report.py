"""Results files, the Markdown table, plots and report.html of a run directory."""

from __future__ import annotations

import json
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_results import row  # one results row of the shape evaluate writes

from krrst import report
from krrst.infra.errors import KrrstError
from krrst.pipeline import preset_config
from krrst.report import markdown_table, summarize, write_report
from krrst.results import append_results

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def table_cells(markdown: str) -> dict[str, list[str]]:
    """Method label -> its cells, from the first Markdown table in `markdown`."""
    all_lines = markdown.splitlines()
    first = next(index for index, line in enumerate(all_lines) if line.startswith("|"))
    lines = []
    for line in all_lines[first:]:  # the first table only: the paired differences follow it
        if not line.startswith("|"):
            break
        lines.append(line)
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    cells = {}
    for line in lines[2:]:
        parts = [cell.strip() for cell in line.strip("|").split("|")]
        cells[parts[0]] = parts[1:]
    cells["__header__"] = header[1:]
    return cells


# --------------------------------------------------------------------------- provenance in the report
def test_the_report_shows_each_sets_provenance(tmp_path):
    sets = {"krr-st": {"images": 10, "storage_bytes": 4000, "parameterization": "pixels"},
            "random": {"images": 10, "storage_bytes": 4000, "parameterization": "pixels"}}
    (tmp_path / report.SETS_NAME).write_text(json.dumps(sets))
    append_results(tmp_path, [{**row(), "provenance": "distill:0123456789abcdef"}, row(method="random")])
    markdown = write_report(tmp_path)["results_md"].read_text()
    assert "| krr-st | 10 | pixels | 0.00 | 1.00x | distill:0123456789abcdef |" in markdown
    assert "| random | 10 | pixels | 0.00 | 1.00x | – |" in markdown, "rows of an older file name none"
    assert "sets krr-st distill:0123456789abcdef." in markdown
    assert "distill:0123456789abcdef" in (tmp_path / "report.html").read_text()


# --------------------------------------------------------------------------- summaries and tables
def test_summarize_mean_and_sample_std():
    accuracies = [0.61, 0.64, 0.70, 0.58]
    rows = [row(seed=seed, accuracy=value) for seed, value in enumerate(accuracies)] + [row(method="none", accuracy=0.3)]
    summaries = summarize(rows)
    assert [s["method"] for s in summaries] == ["krr-st", "none"]
    krr = summaries[0]
    assert krr["n"] == 4 and krr["seeds"] == [0, 1, 2, 3]
    assert krr["mean"] == pytest.approx(statistics.mean(accuracies))
    assert krr["std"] == pytest.approx(statistics.stdev(accuracies))  # ddof=1
    assert summaries[1]["std"] == 0.0 and summaries[1]["n"] == 1


def test_markdown_table_mean_std_and_bold_best():
    rows = [row(method="krr-st", seed=s, accuracy=a) for s, a in enumerate([0.50, 0.52, 0.54])]
    rows += [row(method="random", seed=s, accuracy=a) for s, a in enumerate([0.40, 0.45, 0.47])]
    rows += [row(method="none", seed=s, accuracy=a) for s, a in enumerate([0.30, 0.30, 0.30])]
    cells = table_cells(markdown_table(rows))
    assert cells["__header__"] == ["cifar10 finetune"]
    assert cells["krr-st"] == ["**52.0 ± 2.0**"]
    expected_random = f"{100 * statistics.mean([0.40, 0.45, 0.47]):.1f} ± {100 * statistics.stdev([0.40, 0.45, 0.47]):.1f}"
    assert cells["random"] == [expected_random] == ["44.0 ± 3.6"]
    assert cells["none"] == ["30.0 ± 0.0"]


def test_bold_moves_to_the_best_method_per_column():
    rows = [
        row(method="krr-st", protocol="linear@1%", accuracy=0.30),
        row(method="random", protocol="linear@1%", accuracy=0.35),
        row(method="krr-st", protocol="finetune", accuracy=0.60),
        row(method="random", protocol="finetune", accuracy=0.55),
        row(method="full-ssl", protocol="finetune", accuracy=0.90),  # the ceiling is not ranked
    ]
    cells = table_cells(markdown_table(rows))
    assert cells["__header__"] == ["cifar10 linear@1%", "cifar10 finetune"]
    assert cells["krr-st"] == ["30.0 (n=1)", "**60.0 (n=1)**"]
    assert cells["random"] == ["**35.0 (n=1)**", "55.0 (n=1)"]
    assert cells["full-ssl"] == ["–", "90.0 (n=1)"]


def test_one_seed_cell_shows_no_spread_and_its_n():
    rows = [row(method="krr-st", seed=s, accuracy=0.5) for s in range(3)] + [row(method="random", seed=0, accuracy=0.4)]
    rows += [row(method="none", seed=s, accuracy=0.3) for s in range(2)]
    cells = table_cells(markdown_table(rows))
    assert cells["random"] == ["40.0 (n=1)"], "one seed has no std to show"
    assert cells["krr-st"] == ["**50.0 ± 0.0**"], "three equal seeds: a measured zero spread"
    assert cells["none"] == ["30.0 ± 0.0 (n=2)"]


def test_methods_ordered_krr_st_first_none_and_ceiling_last():
    methods = ["full-ssl", "none", "kmeans", "mtt_cifar10", "random", "krr-st"]
    rows = [row(method=m, accuracy=0.1 * (i + 1)) for i, m in enumerate(methods)]
    labels = [label for label in table_cells(markdown_table(rows)) if label != "__header__"]
    assert labels == ["krr-st", "random", "kmeans", "mtt_cifar10", "none", "full-ssl"]


def test_markdown_table_per_architecture():
    rows = [row(arch="convnet3", accuracy=0.5), row(arch="resnet18", accuracy=0.6)]
    both = markdown_table(rows)
    assert "arch convnet3" in both and "arch resnet18" in both
    only = markdown_table(rows, arch="resnet18")
    assert table_cells(only)["krr-st"] == ["60.0 (n=1)"] and "convnet3" not in only
    assert "No results" in markdown_table([])


# --------------------------------------------------------------------------- plots
def test_bar_chart_and_loss_curve_write_pngs(tmp_path):
    rows = [row(method=m, seed=s, accuracy=0.3 + 0.05 * s) for m in ("krr-st", "none") for s in range(2)]
    chart = report.bar_chart(rows, tmp_path / "chart.png")
    assert chart.read_bytes().startswith(PNG_SIGNATURE)

    loss_csv = tmp_path / "loss.csv"
    loss_csv.write_text("step,loss,val_loss,lr\n0,2.0,2.1,0.1\n1,1.5,,0.1\n2,1.0,1.2,0.1\n")
    curve = report.loss_curve(loss_csv, tmp_path / "curve.png")
    assert curve.read_bytes().startswith(PNG_SIGNATURE)
    from_rows = report.loss_curve([{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}], tmp_path / "rows.png")
    assert from_rows.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(KrrstError, match="no results"):
        report.bar_chart([], tmp_path / "empty.png")


# --------------------------------------------------------------------------- report.html
class StrictParser(HTMLParser):
    """Collects tags and image sources, and checks that non-void elements nest properly."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.image_sources: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.image_sources.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse_html(text: str) -> StrictParser:
    parser = StrictParser()
    parser.feed(text)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    return parser


def tiny_png(path: Path) -> bytes:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), (200, 10, 10)).save(path, format="PNG")
    return path.read_bytes()


def test_write_report_on_a_full_run_directory(tmp_path):
    import base64

    run = tmp_path / "run"
    preview_bytes = tiny_png(run / "distill" / "preview.png")
    (run / "distill" / "loss.csv").write_text("step,loss,val_loss\n0,3.0,3.2\n10,2.0,\n20,1.0,1.4\n")
    (run / "config.json").write_text(json.dumps({"distill": {"lr": 0.01, "note": "<script>alert(1)</script>"}}))
    (run / "env.json").write_text(
        json.dumps({"versions": {"torch": "2.14.1"}, "git_commit": "abc123", "device": "cpu", "command": ["krrst", "run"]})
    )
    (run / "timings.json").write_text(json.dumps({"teacher": 3725.0, "distill": 12.5}))
    append_results(run, [row(method="krr-st", seed=s, accuracy=a) for s, a in enumerate([0.50, 0.52, 0.54])])
    append_results(run, [row(method="random<b>", seed=0, accuracy=0.40)])

    paths = write_report(run)
    assert set(paths) == {"results_md", "results_png", "report_html"}
    assert paths["results_png"].read_bytes().startswith(PNG_SIGNATURE)

    markdown = paths["results_md"].read_text()
    assert "**52.0 ± 2.0**" in markdown and "commit abc123" in markdown

    page = paths["report_html"].read_text()
    parser = parse_html(page)
    assert "data:image/png;base64," + base64.b64encode(preview_bytes).decode() in parser.image_sources
    assert all(src.startswith("data:image/png;base64,") for src in parser.image_sources)
    assert len(parser.image_sources) == 2  # preview, distill curves; no paired differences (no random, no none)
    assert "No paired differences" in "".join(parser.text)
    assert "<strong>52.0 ± 2.0</strong>" in page
    assert "script" not in parser.tags and "link" not in parser.tags  # escaped, self-contained
    text = "".join(parser.text)
    assert "<script>alert(1)</script>" in text and "random<b>" in text  # shown as text, not markup
    assert '"lr": 0.01' in text
    assert "1:02:05" in text and "2.14.1" in text and "abc123" in text
    assert "teacher/loss.csv" in text  # the missing teacher log is noted


def test_sets_table_shows_images_and_storage_against_krrst(tmp_path):
    sets = {"random": {"images": 200, "storage_bytes": 4_096_000, "parameterization": "pixels"},
            "krr-st": {"images": 400, "storage_bytes": 3_940_352, "parameterization": "basis"}}
    table = report.sets_table(sets)
    lines = table.splitlines()
    assert "| krr-st | 400 | basis | 3.94 | 1.00x |" in lines and "| random | 200 | pixels | 4.10 | 1.04x |" in lines
    assert lines.index("| krr-st | 400 | basis | 3.94 | 1.00x |") < lines.index("| random | 200 | pixels | 4.10 | 1.04x |")
    assert "vs krr-st" not in report.sets_table({"random": sets["random"]})
    with pytest.raises(KrrstError, match="sets.json: entry 'random' needs integer images"):
        report.sets_table({"random": {"images": "many", "storage_bytes": 1}})

    append_results(tmp_path, [row(method="krr-st", seed=0, accuracy=0.5)])
    (tmp_path / report.SETS_NAME).write_text(json.dumps(sets))
    assert "| random | 200 | pixels | 4.10 | 1.04x |" in write_report(tmp_path)["results_md"].read_text()
    (tmp_path / report.SETS_NAME).write_text(json.dumps({"random": {"images": 1}}))
    paths = write_report(tmp_path)
    assert "| random |" not in paths["results_md"].read_text()
    assert "sets.json left out" in "".join(parse_html(paths["report_html"].read_text()).text)


def test_write_report_on_an_empty_run_directory(tmp_path):
    paths = write_report(tmp_path)
    assert set(paths) == {"report_html"}
    parser = parse_html(paths["report_html"].read_text())
    text = "".join(parser.text)
    assert "No results yet" in text and "No config.json" in text
    assert parser.image_sources == []
    assert "No results yet" in report.report_text(tmp_path)
    with pytest.raises(KrrstError, match="run directory not found"):
        write_report(tmp_path / "absent")


def test_write_report_notes_corrupt_pieces_instead_of_crashing(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "distill").mkdir()
    (tmp_path / "distill" / "preview.png").write_bytes(b"not a png")
    (tmp_path / "distill" / "loss.csv").write_text("")
    (tmp_path / "results.csv").write_text("a,b\n1,2\n")
    page = write_report(tmp_path)["report_html"].read_text()
    text = "".join(parse_html(page).text)
    assert "not valid JSON" in text
    assert "not a PNG" in text
    assert "could not be plotted" in text
    assert "results.csv could not be read" in text


def test_report_text_is_the_markdown_table(tmp_path, capsys):
    append_results(tmp_path, [row(seed=0, accuracy=0.5), row(seed=1, accuracy=0.7)])
    assert table_cells(report.report_text(tmp_path))["krr-st"] == ["60.0 ± 14.1"]
    from krrst.cli import main

    assert main(["report", str(tmp_path)]) == 0
    assert "60.0 ± 14.1" in capsys.readouterr().out


def test_a_one_seed_run_reads_n1_in_results_md_the_console_and_report_html(tmp_path):
    append_results(tmp_path, [row(method="krr-st", accuracy=0.184), row(method="none", accuracy=0.1)])
    paths = write_report(tmp_path)
    results_md = paths["results_md"].read_text()
    console = report.report_text(tmp_path)  # what `krrst report RUN` prints
    page = parse_html(paths["report_html"].read_text())
    html_text = "".join(page.text)
    for shown in (results_md, console, html_text):
        assert "18.4 (n=1)" in shown and "10.0 (n=1)" in shown and "±" not in shown.split("Provenance")[0]
        assert "one seed per cell (seed 0), so no spread over seeds" in shown
    assert table_cells(results_md)["krr-st"] == table_cells(console)["krr-st"] == ["**18.4 (n=1)**"]


def test_disk_usage_names_the_total_and_the_largest_subfolders(tmp_path):
    sizes = {"eval/pretrained/a.safetensors": 3000, "eval/b": 500, "distill/distilled.safetensors": 2000,
             "teacher/teacher.safetensors": 1000, "baselines/random.safetensors": 10, "env.json": 7}
    for name, size in sizes.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)
    assert report.disk_usage_text(tmp_path) == (
        f"{tmp_path} holds 6.5 kB (eval/ 3.5 kB, distill/ 2.0 kB, teacher/ 1.0 kB)\n"
    )
    assert report.disk_usage_text(tmp_path, largest=1).endswith("(eval/ 3.5 kB)\n")
    assert report.report_text(tmp_path).endswith(report.disk_usage_text(tmp_path))
    assert [report.format_bytes(n) for n in (999, 1000, 1_260_000, 325_000_000, 4.2e12)] == [
        "999 B", "1.0 kB", "1.3 MB", "325.0 MB", "4200.0 GB"]


# --------------------------------------------------------------------------- paired differences
def t_density_mass(t: float, df: int, intervals: int = 20_000) -> float:
    """P(|T| <= t) by Simpson's rule on Student's t density: an oracle independent of the closed form."""
    import math

    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = lambda x: math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))  # noqa: E731
    h = t / intervals
    total = density(0) + density(t) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, intervals))
    return 2 * total * h / 3


# t(0.975, df) as printed in the usual t tables (three decimals).
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 20: 2.086, 29: 2.045, 30: 2.042,
           60: 2.000, 120: 1.980}


def test_t_quantile_matches_the_printed_table_and_the_density():
    import math

    for df, printed in T_TABLE.items():
        assert abs(report.t_quantile(df) - printed) <= 5e-4 + 1e-12, df  # the table rounds to 3 decimals
    assert report.t_quantile(1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)  # Cauchy: closed form
    assert report.t_quantile(2) == pytest.approx(math.sqrt(2 * 0.95**2 / (1 - 0.95**2)), rel=1e-12)  # t/sqrt(2+t^2)=.95
    for df in (1, 2, 3, 4, 7, 12):
        for t in (0.5, 1.7, 4.0):
            assert report._t_central_mass(t, df) == pytest.approx(t_density_mass(t, df), abs=1e-9)
    assert 1.959 < report.t_quantile(5000) < report.t_quantile(100) < report.t_quantile(99)
    with pytest.raises(ValueError):
        report.t_quantile(0)


def test_paired_summary_is_the_mean_and_t_interval_computed_by_hand():
    import math

    differences = [1.5, -0.5, 2.5]
    mean = 3.5 / 3
    std = math.sqrt(((1.5 - mean) ** 2 + (-0.5 - mean) ** 2 + (2.5 - mean) ** 2) / 2)
    half = math.sqrt(2 * 0.95**2 / (1 - 0.95**2)) * std / math.sqrt(3)  # t(0.975, 2) in closed form
    summary = report.paired_summary(differences)
    assert summary["n"] == 3 and summary["wins"] == 2 and summary["losses"] == 1
    assert summary["mean"] == pytest.approx(mean, rel=1e-12)
    assert summary["low"] == pytest.approx(mean - half, rel=1e-9) and summary["high"] == pytest.approx(mean + half, rel=1e-9)
    one = report.paired_summary([0.7])
    assert one["mean"] == 0.7 and one["low"] is None and one["high"] is None and one["wins"] == 1


def three_seed_rows():
    """krr-st, random and none on two protocols, 3 seeds; krr-st lacks seed 2 of linear."""
    accuracy = {("krr-st", "linear"): [0.50, 0.46, None], ("random", "linear"): [0.48, 0.47, 0.45],
                ("none", "linear"): [0.30, 0.31, 0.33], ("krr-st", "finetune"): [0.60, 0.62, 0.61],
                ("random", "finetune"): [0.61, 0.60, 0.615], ("none", "finetune"): [0.62, 0.63, 0.60]}
    return [row(method=method, protocol=protocol, seed=seed, accuracy=value)
            for (method, protocol), values in accuracy.items() for seed, value in enumerate(values) if value is not None]


def test_paired_comparisons_pair_rows_by_seed_against_each_later_reference():
    comparisons = report.paired_comparisons(three_seed_rows())
    pairs = [(c["method"], c["reference"], c["protocol"]) for c in comparisons]
    assert pairs == [("krr-st", "random", "linear"), ("krr-st", "random", "finetune"),
                     ("krr-st", "none", "linear"), ("random", "none", "linear"),
                     ("krr-st", "none", "finetune"), ("random", "none", "finetune")]
    first = comparisons[0]
    assert first["seeds"] == [0, 1], "seed 2 has no krr-st row: unpaired"
    assert first["differences"] == pytest.approx([100 * (0.50 - 0.48), 100 * (0.46 - 0.47)], abs=1e-9)
    assert first["mean"] == pytest.approx(0.5, abs=1e-9) and first["wins"] == 1 and first["n"] == 2
    finetune = comparisons[1]
    expected = [100 * (a - b) for a, b in zip([0.60, 0.62, 0.61], [0.61, 0.60, 0.615])]
    assert finetune["differences"] == pytest.approx(expected, abs=1e-9)
    assert finetune["mean"] == pytest.approx(statistics.mean(expected), abs=1e-9)
    half = report.t_quantile(2) * statistics.stdev(expected) / 3**0.5
    assert (finetune["low"], finetune["high"]) == pytest.approx((finetune["mean"] - half, finetune["mean"] + half))
    assert [c["reference"] for c in report.paired_comparisons(three_seed_rows(), ["none"])] == ["none"] * 4


def test_image_change_and_target_drift_by_hand():
    import torch

    from krrst.distilled import DistilledSet

    start = DistilledSet(torch.zeros(2, 3, 2, 2), torch.zeros(2, 4), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    moved = torch.zeros(2, 3, 2, 2)
    moved[0, 0, 0, 0] = 0.4  # 0.4 x std 0.25 = 0.1 of the range = 25.5 grey levels, one value of 24
    final = DistilledSet(moved, torch.zeros(2, 4), mean=start.mean, std=start.std)
    change = report.image_change(start, final)
    assert change["mean"] == pytest.approx(25.5 / 24) and change["max"] == pytest.approx(25.5)

    teacher_final = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]], dtype=torch.float64)
    targets = teacher_final + torch.tensor([[0.5, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    drift = report.target_drift(targets, teacher_final, teacher_start=torch.zeros(4, 2))
    assert drift["drift"] == pytest.approx((0.25 + 1.0) / 10.0) and drift["moved"] == pytest.approx(1.0)


def test_config_diff_names_changed_fields_and_leaves_out_fields_the_config_lacks():
    preset = {"distill": {"steps": 200, "lr": 0.1}, "kd": {"epochs": 5}}
    config = {"distill": {"steps": 50, "lr": 0.1, "gone": 1}}
    assert report.config_diff(config, preset) == [("distill.gone", None, 1), ("distill.steps", 200, 50)]


def test_storage_verdict_says_whether_sets_take_equal_storage():
    equal = {"krr-st": {"images": 10, "storage_bytes": 4000}, "random": {"images": 10, "storage_bytes": 4000}}
    assert "compared at equal storage" in report.storage_verdict(equal)
    unequal = {**equal, "basis": {"images": 40, "storage_bytes": 6000}}
    assert report.storage_verdict(unequal).startswith("Not compared at equal storage")
    assert "1.50x the smallest" in report.storage_verdict(unequal)


def full_run(run: Path, preset_steps_changed: bool = True) -> dict:
    """A run folder as `krrst run --preset demo` leaves it, in miniature: sets, a teacher, logs, results."""
    import torch

    from krrst.distilled import DistilledSet
    from krrst.pipeline import resolve_config
    from krrst.teacher import TeacherConfig, build_backbone, save_teacher

    config = {"preset": "demo", **resolve_config("demo", {"distill.steps": "7", "run.note": ""}).to_dict()}
    (run / "distill").mkdir(parents=True)
    (run / "baselines").mkdir()
    (run / "teacher").mkdir()
    (run / "config.json").write_text(json.dumps(config))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # a fixed teacher: the figures below depend on its weights
        torch.manual_seed(0)
        teacher = build_backbone(TeacherConfig(arch="convnet3", convnet_widths=(4, 4, 4)), 8).eval()
    save_teacher(run / "teacher" / "teacher.safetensors", teacher, mean, std)
    start_images = torch.randn(6, 3, 8, 8, generator=generator)
    final_images = start_images + 0.05 * torch.randn(6, 3, 8, 8, generator=generator)
    with torch.no_grad():
        teacher_start, teacher_final = teacher(start_images).double(), teacher(final_images).double()
    # a third of the features' spread: a drift of about 0.1, well above float32 round-off in the teacher's forward
    offset = 0.3 * teacher_final.std(0) * torch.randn(teacher_final.shape, generator=generator, dtype=torch.float64)
    DistilledSet(start_images, teacher_start.float(), mean, std, method="random").save(run / "baselines" / "random.safetensors")
    DistilledSet(final_images, (teacher_final + offset).float(), mean, std).save(run / "distill" / "distilled.safetensors")
    (run / "teacher" / "health.json").write_text(json.dumps(
        {"knn_k": 20, "knn_accuracy": 0.381, "random_knn_accuracy": 0.254, "effective_rank": 136.2, "feature_dim": 2048,
         "std_median": 0.437, "relative_median_std": 0.707, "dead_fraction": 0.0, "images": "held-out set"}))
    (run / "teacher" / "loss.csv").write_text("step,loss,lr,elapsed_s\n0,80,0.1,1\n10,50,0.1,2\n")
    (run / "distill" / "loss.csv").write_text(
        "step,loss,lr,val_loss,val_reference,elapsed_s\n0,,0.01,0.10,0.22,0\n10,0.09,0.008,,,4\n20,0.07,0.006,0.08,0.22,8\n")
    (run / report.SETS_NAME).write_text(json.dumps({m: {"images": 6, "storage_bytes": 4000, "parameterization": "pixels"}
                                                    for m in ("krr-st", "random")}))
    (run / "env.json").write_text(json.dumps({"git_commit": "abc123", "device": "cpu"}))
    (run / "timings.json").write_text(json.dumps({"teacher": 3725.0, "distill": 12.5}))
    append_results(run, three_seed_rows())
    pixels = lambda images: 255 * (images.double() * torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)  # noqa: E731
                                   + torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1))
    spread = (teacher_final - teacher_final.mean(0)).pow(2).sum()
    return {"grey": float((pixels(final_images) - pixels(start_images)).abs().mean()),
            "drift": float(offset.pow(2).sum() / spread), "moved": float((teacher_final - teacher_start).pow(2).sum() / spread)}


class AttributeParser(StrictParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.ids: list[str] = []

    def handle_starttag(self, tag, attrs):
        super().handle_starttag(tag, attrs)
        found = dict(attrs)
        self.urls += [found[name] for name in ("src", "href", "action", "data") if name in found]
        if "id" in found:
            self.ids.append(found["id"])


def test_the_page_leads_with_paired_differences_and_shows_every_section(tmp_path):
    expected = full_run(tmp_path)
    page = write_report(tmp_path, preset_config=preset_config)["report_html"].read_text()
    parser = AttributeParser()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    assert parser.ids == ["headline", "accuracy", "images", "teacher", "distillation", "storage", "config", "environment"]
    assert page.index('id="headline"') < page.index('id="accuracy"'), "the paired differences come first"
    # self-contained: no external URL anywhere, images as data URIs, anchors within the page, no script
    assert all(url.startswith("data:image/png;base64,") or url.startswith("#") for url in parser.urls)
    assert "http://" not in page and "https://" not in page and "script" not in parser.tags
    text = " ".join(parser.text)
    # the headline numbers: krr-st - random on finetune, by hand
    differences = [100 * (a - b) for a, b in zip([0.60, 0.62, 0.61], [0.61, 0.60, 0.615])]
    mean = statistics.mean(differences)
    half = report.t_quantile(2) * statistics.stdev(differences) / 3**0.5
    assert f"{mean:+.2f}" in text and f"[{mean - half:+.1f}, {mean + half:+.1f}]" in text
    assert "1/3" in text and "t-interval" in text and "Abramowitz" in text
    lead = page[page.index('<p class="lead">'):page.index("</p>", page.index('<p class="lead">'))]
    assert "krr-st minus random: cifar10 linear +0.5" in lead and f"cifar10 finetune {mean:+.1f}" in lead
    assert "<strong>" not in lead, "every interval here holds 0 (krr-st - none on linear: 2 seeds, t(0.975, 1) = 12.7)"

    # finetune's best mean is none's: the page says what the paired differences make of it
    assert "cifar10 finetune: the highest mean is none's" in text
    # what distillation changed, by hand
    assert f"by {expected['grey']:.1f} grey levels on average" in text
    import re

    # the page's figures against float64 ones: the teacher runs in float32 (relative error ~1e-6 at this spread)
    shown = re.search(r"relative MSE ([0-9.]+) .* moved by ([0-9.]+) ", text)
    assert float(shown[1]) == pytest.approx(expected["drift"], abs=1e-3) and 0.02 < expected["drift"] < 1
    assert float(shown[2]) == pytest.approx(expected["moved"], abs=1e-3) and expected["moved"] > 0.002
    # the teacher against a random network, the distillation's reference, storage, the config as a diff
    assert "38.1%" in text and "25.4%" in text and "136.2 of 2048" in text
    assert "0.08 at step 20 (mean predictor 0.22)" in text and "0.4 s per outer step" in text
    assert "compared at equal storage" in text
    assert "distill.steps" in text and "preset demo" in text
    assert "\"steps\": 7" in text, "the full config, folded"
    assert "1:02:05" in text and "abc123" in text and "holds" in text


def test_several_runs_merge_into_one_page_with_paired_differences_across_runs(tmp_path):
    first, second = tmp_path / "a" / "e1", tmp_path / "b" / "e1"
    append_results(first, three_seed_rows())
    append_results(second, [row(method="krr-st", protocol="finetune", seed=s, accuracy=a)
                            for s, a in enumerate([0.63, 0.61, 0.64])])
    assert report.run_labels([first, second]) == ["a/e1", "b/e1"]
    paths = report.write_comparison([first, second], tmp_path / "cmp")
    comparisons = report.paired_comparisons(report.merged_rows([first, second]),
                                            report.resolve_references(report.merged_rows([first, second]), ["random", "none"]))
    across = next(c for c in comparisons if c["method"] == "b/e1:krr-st" and c["reference"] == "a/e1:random")
    assert across["differences"] == pytest.approx([100 * (a - b) for a, b in zip([0.63, 0.61, 0.64], [0.61, 0.60, 0.615])])
    assert not any(c["method"] == "a/e1:none" for c in comparisons)
    against_random = [c["method"] for c in comparisons if c["reference"] == "a/e1:random" and c["protocol"] == "finetune"]
    assert against_random == ["a/e1:krr-st", "b/e1:krr-st"], "each method of every run, krr-st first"
    text = " ".join(parse_html(paths["report_html"].read_text()).text)
    assert "b/e1:krr-st" in text and f"{across['mean']:+.2f}" in text
    assert "b/e1:krr-st" in paths["results_md"].read_text()
    with pytest.raises(KrrstError, match="given twice"):
        report.run_labels([first, first])


def test_report_command_merges_runs_only_into_an_out_folder(tmp_path, capsys):
    from krrst.cli import main

    first, second = tmp_path / "e1", tmp_path / "e2"
    append_results(first, three_seed_rows())
    append_results(second, three_seed_rows())
    assert main(["report", str(first), str(second)]) == 2
    assert "give --out DIR" in capsys.readouterr().err
    assert main(["report", str(first), str(second), "--out", str(tmp_path / "cmp"), "--ref", "e2:random"]) == 0
    out = capsys.readouterr().out
    assert "| e1:krr-st | e2:random | linear | +0.50 |" in out
    assert (tmp_path / "cmp" / "report.html").is_file()


def test_the_lead_puts_intervals_clear_of_zero_in_bold():
    rows = [row(method=m, protocol=p, seed=s, accuracy=a) for m, p, values in (
        ("krr-st", "linear", [0.52, 0.55, 0.51]), ("random", "linear", [0.50, 0.52, 0.49]),
        ("krr-st", "finetune", [0.60, 0.58, 0.61]), ("random", "finetune", [0.59, 0.60, 0.60]))
        for s, a in enumerate(values)]
    lead = report._headline_lead(report.paired_comparisons(rows))
    assert "<strong>cifar10 linear +2.3 [" in lead  # +2, +3, +2: the interval [+0.9, +3.8] is clear of 0
    assert "cifar10 finetune +0.0 [" in lead and "<strong>cifar10 finetune" not in lead


def test_a_run_note_leads_the_page_and_the_markdown(tmp_path):
    """`run.note` (what a run can and cannot show) is the first thing the page and results.md say, escaped."""
    full_run(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    page = write_report(tmp_path)["report_html"].read_text()
    assert "At this scale" not in page
    config["run"]["note"] = "At this scale <KRR-ST> & random are level."
    (tmp_path / "config.json").write_text(json.dumps(config))
    paths = write_report(tmp_path)
    page = paths["report_html"].read_text()
    lead = page.index("At this scale &lt;KRR-ST&gt; &amp; random are level.")
    assert lead < page.index('id="headline"')
    assert paths["results_md"].read_text().split("\n")[2] == "At this scale <KRR-ST> & random are level."
