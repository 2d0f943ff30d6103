"""evaluate.py code and sandbox.py: hostile samples fail without harm, pass@k by hand, HumanEval, MBPP, own tasks."""
from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import evaluate  # noqa: E402
import sandbox  # noqa: E402
from conftest import run_script  # noqa: E402

SECRET = "arianna-test-secret-4711"
TASK = evaluate.Task("t", "def add(a, b):\n", "assert add(2, 3) == 5\n", entry_point="add")
LIMITS = sandbox.Limits(cpu_seconds=2, wall_seconds=3)


@pytest.fixture(scope="module")
def box() -> sandbox.Sandbox:
    return sandbox.Sandbox()


def sandbox_leftovers(staging_parent: Path) -> tuple[list[int], list[str]]:
    pids = [pid for uid in {int(line.split()[1]) for pid_dir in Path("/proc").iterdir() if pid_dir.name.isdigit()
                            for line in _status_lines(pid_dir) if line.startswith("Uid:")}
            if sandbox.FIRST_UID <= uid < sandbox.FIRST_UID + sandbox.UID_RANGE for pid in sandbox.user_processes(uid)]
    return pids, [name for name in os.listdir(staging_parent) if name.startswith("arianna-sandbox-")]


def _status_lines(pid_dir: Path) -> list[str]:
    try:
        return (pid_dir / "status").read_text().splitlines()
    except OSError:
        return []


def test_hostile_samples_fail_and_leave_nothing_behind(box: sandbox.Sandbox, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert os.geteuid() == 0, "CI runs as root: the full sandbox (namespaces, own uid) is what this test checks"
    # Staging folders in a temp folder of this test's own, so other runs on the machine cannot show up as leftovers.
    staging_parent = tmp_path / "tmp"
    staging_parent.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging_parent))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    outside = tmp_path / "written-by-sample.txt"
    os.environ["ARIANNA_SANDBOX_SECRET"] = SECRET
    body = "    return a + b\n"
    hostile = {
        "infinite loop": "    while True:\n        pass\n",
        "fork bomb": "    import os\n    while True:\n        try:\n            os.fork()\n        except OSError:\n"
                     "            pass\n",
        "10 GB allocation": "    data = bytearray(10 * 2**30)\n" + body,
        "writing outside": f"    open({str(outside)!r}, 'w').write('x')\n" + body,
        "writing /tmp": "    open('/tmp/arianna-escaped', 'w').write('x')\n    open('../../arianna-escaped', 'w')\n"
                        + body,
        "killing the parent": f"    import os\n    os.kill({os.getpid()}, 9)\n" + body,
        "reading a secret": f"    import os\n    assert os.environ.get('ARIANNA_SANDBOX_SECRET') == {SECRET!r}\n" + body,
        "a socket to 127.0.0.1": "    import socket\n    socket.create_connection(('127.0.0.1', "
                                 f"{listener.getsockname()[1]}), timeout=1)\n" + body,
        "a syntax error": "    return a +\n",
        "sys.exit(0) before the asserts": "    return a - b\nimport sys\nsys.exit(0)\n",
    }
    assert evaluate.execute(TASK, body, box, LIMITS) == (True, "passed")
    for name, completion in hostile.items():
        passed, why = evaluate.execute(TASK, completion, box, LIMITS)
        assert not passed, name
        assert sandbox_leftovers(staging_parent) == ([], []), name
    with pytest.raises(BlockingIOError):
        listener.accept()
    assert not outside.exists() and not Path("/tmp/arianna-escaped").exists()
    assert "network: none" in box.isolation()["isolation"]


def test_pass_at_k_matches_hand_computed_values() -> None:
    assert evaluate.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert evaluate.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)   # 1 - C(7,5)/C(10,5)
    assert evaluate.pass_at_k(5, 2, 4) == 1.0                           # n - c < k: some draw must pass
    assert evaluate.pass_at_k(3, 0, 1) == 0.0
    assert evaluate.pass_at_k(200, 1, 100) == pytest.approx(0.5)        # no overflow on large n


def code(tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "report.json"
    result = run_script("evaluate.py", "code", *flags, f"--out={out}", "--timeout=5", cwd=tmp_path)
    assert result.stdout.count("\n") == 1
    return json.loads(out.read_text())


def test_humaneval_canonical_solutions_pass_and_empty_completions_fail(tmp_path: Path) -> None:
    assert code(tmp_path, "--tasks=humaneval", "--completions=canonical", "--limit=4")["pass@1"] == 1.0
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"task_id": f"HumanEval/{i}", "completion": ""}) + "\n" for i in range(4)))
    report = code(tmp_path, "--tasks=humaneval", f"--completions={empty}", "--limit=4")
    assert report["pass@1"] == 0.0 and report["tasks_scored"] == 4


MBPP = [
    {"task_id": 1, "text": "Write a function to square a number.", "code": "def square(x):\n    return x * x\n",
     "test_list": ["assert square(3) == 9", "assert square(-2) == 4"], "test_setup_code": ""},
    {"task_id": 2, "text": "Write a function that returns the constant.", "code": "def get():\n    return K\n",
     "test_list": ["assert get() == 7"], "test_setup_code": "K = 7"},
]


def test_mbpp_file_own_tasks_in_three_languages_pairs_and_proxy(tmp_path: Path) -> None:
    mbpp = tmp_path / "mbpp.jsonl"
    mbpp.write_text("".join(json.dumps(line) + "\n" for line in MBPP))
    assert code(tmp_path, f"--tasks={mbpp}", "--completions=canonical")["pass@1"] == 1.0
    tasks = [
        {"task_id": "py", "prompt": "def double(x):\n", "tests": "def check(f):\n    assert f(2) == 4\n",
         "entry_point": "double"},
        {"task_id": "c", "language": "c", "prompt": "int twice(int x) {\n",
         "tests": "#include <assert.h>\nint main(void) { assert(twice(4) == 8); return 0; }\n"},
        {"task_id": "js", "language": "javascript", "prompt": "function twice(x) {\n",
         "tests": "if (twice(4) !== 8) throw new Error('wrong');\n"},
        {"task_id": "proxy", "prompt": "def greet(name):\n", "tests": ""},
    ]
    answers = {"py": ["    return x * 2\n", "    return x + 1\n", "    return 4\n"],
               "c": ["    return 2 * x;\n}\n", "    return x;\n}\n"], "js": ["    return x * 2;\n}\n", "    return x;\n}\n"],
               "proxy": ["    return 'hi ' + name\n", "    return undefined_name\n"]}
    task_file, samples = tmp_path / "tasks.jsonl", tmp_path / "samples.jsonl"
    task_file.write_text("".join(json.dumps(task) + "\n" for task in tasks))
    samples.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, cs in answers.items() for c in cs))
    prefs = tmp_path / "prefs.jsonl"
    report = code(tmp_path, f"--tasks={task_file}", f"--completions={samples}", "--k=1,2", f"--pairs_out={prefs}")
    correct = {entry["task_id"]: entry["correct"] for entry in report["results"]}
    assert correct == {"py": 2, "c": 1, "js": 1, "proxy": 1} and report["proxy_tasks"] == 1
    assert report["pass@1"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2 + 1 / 2) / 4)
    lines = [json.loads(line) for line in prefs.read_text().splitlines()]
    pairs = [line for line in lines if "chosen" in line]
    assert len(pairs) == 2 + 1 + 1 + 1 and len(lines) - len(pairs) == 9
    assert all(line["chosen"] in answers[next(t["task_id"] for t in tasks if t["prompt"] == line["prompt"])]
               for line in pairs)
    assert {("proxy" in line) for line in lines if line["prompt"] == "def greet(name):\n"} == {True}
    assert [line["label"] for line in lines if "label" in line and line["prompt"] == "def double(x):\n"] == [True, False, True]


def test_all_pass_or_all_fail_gives_no_pair(tmp_path: Path) -> None:
    results = [{"prompt": "p", "proxy": False, "samples": [{"completion": c, "passed": True} for c in "ab"]},
               {"prompt": "q", "proxy": False, "samples": [{"completion": c, "passed": False} for c in "ab"]}]
    assert evaluate.write_preferences(tmp_path / "prefs.jsonl", results, seed=0) == {"pairs": 0, "labelled": 4}


@pytest.mark.parametrize("flags, message", [
    (["--tasks=missing.jsonl", "--completions=canonical"], "missing.jsonl not found"),
    (["--tasks=mbpp", "--completions=canonical"], "MBPP is not shipped"),
    (["--tasks=humaneval"], "give a MODEL"),
    (["--tasks=humaneval", "--completions=canonical", "--k=one"], "--k=one"),
])
def test_code_bad_input_is_one_line(flags: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["code", *flags])
    error = str(exit_info.value.code)
    assert error.startswith("error: ") and "\n" not in error and message in error


def test_similarity_bleu_chrf_and_codebleu(tmp_path: Path) -> None:
    code_lines = ["def add(a, b):\n    return a + b\n", "def neg(x):\n    return -x\n"]
    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(json.dumps({"code": c}) + "\n" for c in code_lines))
    out = tmp_path / "similarity.json"
    result = run_script("evaluate.py", "similarity", f"--hyp={ref}", f"--ref={ref}", "--lang=python", f"--out={out}",
                        cwd=tmp_path)
    assert "CodeBLEU 1.000" in result.stdout
    same = json.loads(out.read_text())
    assert same["bleu"] == pytest.approx(100) and same["chrf"] == pytest.approx(100)
    hyp = tmp_path / "hyp.jsonl"
    hyp.write_text("".join(json.dumps(c.replace("a + b", "b - a")) + "\n" for c in code_lines))
    run_script("evaluate.py", "similarity", f"--hyp={hyp}", f"--ref={ref}", "--lang=python", f"--out={out}", cwd=tmp_path)
    changed = json.loads(out.read_text())
    assert 0 < changed["codebleu"]["codebleu"] < 1 and changed["bleu"] < 100
    short = tmp_path / "short.txt"
    short.write_text("one line\n")
    with pytest.raises(SystemExit, match="need the same number"):
        evaluate.main(["similarity", f"--hyp={short}", f"--ref={ref}"])
