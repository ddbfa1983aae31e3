"""`python -m bench.stage_memory` measures one fresh process per role set and tells their loads apart."""

from __future__ import annotations

import json

from bench.stage_memory import main


def test_each_role_set_reports_the_memory_of_its_own_part(tiny_qwen2_vl, tmp_path, capsys):
    out = tmp_path / "memory.json"
    main(["--model", str(tiny_qwen2_vl), "--roles", "EPD,E,D", "--output", str(out)])
    rows = {r["roles"]: r for r in json.loads(out.read_text())}
    assert rows["EPD"]["parts"] == ["text", "vision"]
    assert rows["E"]["parts"] == ["vision"] and rows["D"]["parts"] == ["text"]
    assert rows["E"]["parameters"] + rows["D"]["parameters"] == rows["EPD"]["parameters"]
    assert rows["E"]["kv_bytes_per_token"] == 0 < rows["D"]["kv_bytes_per_token"]
    for r in rows.values():
        assert 0 < r["rss_before_load"] <= r["rss_after_load"] <= r["peak_rss"]
    assert "| E | vision |" in capsys.readouterr().out
