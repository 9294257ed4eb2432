"""The peers phase's result as bench.md shows it: ours (the sweep's fastest stage) against each peer."""

import json
from pathlib import Path
from typing import List, Optional


def fastest_run(runs: List[dict]) -> Optional[dict]:
    """Ours: the sweep's fastest stage that ended ok, as the row the peers are divided by."""
    ok = [r for r in runs if r.get("status") == "ok" and r.get("tokens_per_sec")]
    if not ok:
        return None
    r = max(ok, key=lambda r: r["tokens_per_sec"])
    return {"peer": f"ours ({r.get('stage')})", "status": "ok", "reason": "", "batch_size": r.get("batch_size"),
            "seq_len": r.get("seq_len"), "tokens_per_step": r.get("tokens_per_step"),
            "ms_per_step": r.get("ms_per_step"), "tokens_per_sec": r["tokens_per_sec"], "ours_over_peer": 1.0}


def ours_over_peer(ours: Optional[dict], peer: dict) -> Optional[float]:
    """Our tok/s over the peer's (above 1: ours is faster); None unless both measured."""
    if not ours or peer.get("status") != "ok" or not ours.get("tokens_per_sec") or not peer.get("tokens_per_sec"):
        return None
    return ours["tokens_per_sec"] / peer["tokens_per_sec"]


def _num(value, spec: str) -> str:
    return "" if value is None else spec.format(value)


def peers_markdown(result: dict) -> List[str]:
    """The "peers, same card, same call" section of bench.md.

    Rows written as f-strings, where report.md goes through pandas' to_markdown (tabulate): bench.md is rewritten
    after every phase of a GPU run by the bench's driver process, which has no other use for pandas, and the
    rows are short, fixed columns that tests/test_peers.py and tests/test_bench.py read back unpadded."""
    sizes = result["sizes"]
    lines = ["", "## Peers, same card, same call", "",
             f"GPT-2 124M from random init on Tiny Shakespeare, B={sizes['batch_size']}, T={sizes['seq_len']}, "
             f"{sizes['total_batch']:,} tokens per optimizer step, {sizes['steps']} steps; ms/step is the median "
             f"after the first {sizes['skip']}, tok/s = tokens per step / that. ours/peer = our fastest sweep "
             "stage's tok/s over the peer's (above 1: ours is faster)."]
    if result.get("smoke"):
        lines.append("Smoke run: a stand-in llm.c and a tiny transformers model on the CPU; measures nothing.")
    lines += ["", "| run | status | B | T | tokens/step | ms/step | tok/s | ours/peer | note |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in ([result["ours"]] if result.get("ours") else []) + result["peers"]:
        lines.append(f"| {r['peer']} | {r['status']} | {r.get('batch_size') or ''} | {r.get('seq_len') or ''} | "
                     f"{_num(r.get('tokens_per_step'), '{:,}')} | {_num(r['ms_per_step'], '{:.1f}')} | "
                     f"{_num(r['tokens_per_sec'], '{:,.0f}')} | {_num(r['ours_over_peer'], '{:.2f}x')} | "
                     f"{r['reason'] or _note(r)} |")
    if not result.get("ours"):
        lines += ["", "No stage of the sweep ended ok, so there is no ours/peer."]
    return lines


def _note(row: dict) -> str:
    if row["peer"] == "llm.c":
        commit = (row.get("commit") or "")[:7] or "no git commit"
        return f"train_gpt2cu {commit}, cuDNN attention {'on' if row.get('cudnn') else 'off'}"
    if row["peer"] == "transformers":
        return (f"transformers {row.get('transformers')}, {row.get('attn_implementation')}, "
                f"{'compiled' if row.get('compiled') else 'eager'}, autocast {row.get('autocast')}")
    return "fastest stage of the sweep"


def peers_table(out: Path) -> List[str]:
    """bench.md's peers section from DIR/peers.json; nothing before the phase has run."""
    path = Path(out) / "peers.json"
    return peers_markdown(json.loads(path.read_text())) if path.is_file() else []
