"""A stand-in for `python -m nola_vision.cli fit` in protocol runs: for tests of the protocol's own bookkeeping
(folders, claims, settings, tables), where a real fit would only add a process start importing Lightning."""
import sys


def fake_python(tmp_path, acc="0.5", code=0, extra="", metric="test/acc"):
    """A stand-in for `python -m nola_vision.cli fit`: writes the result file at once (``metric``: ``acc``; ``extra``:
    more fields, as Python source), then exits with ``code``."""
    script = tmp_path / f"fake_python_{abs(hash((acc, code, extra, metric)))}"
    script.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
json.dump({{"metrics": {{"{metric}": float("{acc}")}}, {extra}
           "config": {{"method": "fake", "split_seed": int(value("--data.split_seed")),
                      "seed": int(value("--seed_everything"))}},
           "parameter_counts": {{"adapter": 8, "head": 2}}}}, open(value("--result_file"), "w"))
sys.exit({code})
""")
    script.chmod(0o755)
    return str(script)
