"""`fastgpt info`: what this machine can run, as text and as JSON, from the registries."""

from __future__ import annotations

import json

from fastgpt.attention import AttentionCall, kernel_path_names, refusal
from fastgpt.cli import main


def test_info_json_lists_every_kernel_path_with_its_state(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) >= {"versions", "machine", "extension", "kernel_paths", "auto_order", "model_kernels"}
    assert info["versions"]["torch"] and info["machine"]["threads"] >= 1
    cpu = info["kernel_paths"]["cpu"]
    assert list(cpu) == kernel_path_names()
    import torch

    for name, row in cpu.items():
        assert set(row) == {"float32", "bfloat16", "float16"}
        for dtype_name, state in row.items():
            call = AttentionCall(batch=8, heads=8, kv_heads=8, q_len=256, kv_len=256, head_dim=64,
                                 dtype=getattr(torch, dtype_name), device=torch.device("cpu"), dropout_p=0.0,
                                 scale=0.125)
            # each state is the registry's own answer, word for word
            assert state == (refusal(call, name) or "available"), (name, dtype_name)
    assert cpu["naive"]["float32"] == "available"
    assert cpu["ext.cuda"]["float32"].startswith("a CUDA kernel")
    assert info["auto_order"]["cpu"]["plain"][-1] == "naive"
    assert info["extension"]["status"].startswith(("loaded", "unavailable"))
    assert info["extension"]["build_flags"]
    from fastgpt.attention import OPTIONS, get_path

    # the options each path takes, as the registry declares them
    assert info["options"] == {name: [o for o in OPTIONS if o in get_path(name).options] for name in cpu}
    assert info["options"]["naive"] == list(OPTIONS)


def test_info_text_names_versions_extension_and_paths(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("versions: fastgpt ")
    assert "C++ extension: " in text and "build flags: " in text
    for name in kernel_path_names():
        assert f"  {name} " in text
    assert "auto, plain calls: " in text and "model kernels on cpu: " in text
    assert "options: bidirectional, window, softcap, sinks, alibi, return_lse" in text


def test_info_lists_the_fused_ops_paths_and_their_options(capsys):
    from fastgpt.ops import REGISTRIES

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    for registry in REGISTRIES:
        assert f"{registry.op} kernel paths:" in text
        for name in registry.kernel_path_names():
            assert f"  {name}  {registry.get_path(name).description}; options: " in text
