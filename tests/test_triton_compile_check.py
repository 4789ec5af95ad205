"""The Triton kernels' offline compile check (fastgpt.verify.triton_compile, the first half of
`fastgpt check`): every shipped config compiles for sm_80 and sm_90 without spills.

Compiling needs a process where Triton is not interpreting, so everything here runs in a
subprocess without TRITON_INTERPRET. The full check compiles several hundred kernels, and its
results depend only on what record_key hashes: while the committed record's key matches, the full
check's assertions run on the record instead of on a fresh compile, and a kernel change makes the
suite compile everything again and ask for the record to be refreshed.
"""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed")

from fastgpt.kernels import flash_attention_configs as cfg  # noqa: E402
from fastgpt.verify import triton_compile as triton_compile_check  # noqa: E402


REPO = Path(__file__).resolve().parent.parent
RECORD = REPO / "benchmarks" / "results" / "triton_compile_check.json"
REFRESH = f"python -m fastgpt.verify.triton_compile --json {RECORD.relative_to(REPO)}"
FULL_CHECK = (triton_compile_check.compile_check.ARCHS, list(triton_compile_check.DTYPES), cfg.CHECKED_HEAD_DIMS)


def _compiler_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _record():
    """(summary, results) of the committed record, or None without one."""
    return triton_compile_check.read_json(RECORD) if RECORD.is_file() else None


def _full_check(tmp_path) -> tuple[int, str, list]:
    """(exit status, printed text, results) of the full check: the committed record's while its key
    is this checkout's, a fresh compile otherwise."""
    record = _record()
    if record is not None and record[0].get("key") == triton_compile_check.record_key(*FULL_CHECK):
        summary, results = record
        # the record holds the results of exactly the jobs the check runs now, each once
        assert sorted(map(repr, (r.job for r in results))) == sorted(map(repr, triton_compile_check.jobs(*FULL_CHECK)))
        text, status = triton_compile_check.report(results, False, summary["seconds"])
        return status, text, results
    out_json = tmp_path / "check.json"
    out = subprocess.run([sys.executable, "-m", "fastgpt.verify.triton_compile", f"--json={out_json}"],
                         env=_compiler_env(), capture_output=True, text=True, timeout=3600)
    assert out_json.is_file() or out.returncode != 0, out.stdout[-5000:] + out.stderr[-5000:]
    results = triton_compile_check.read_json(out_json)[1] if out_json.is_file() else []
    return out.returncode, out.stdout + out.stderr[-5000:], results


def test_jobs_cover_every_kernel_arch_dtype_head_dim_and_dropout():
    jobs = triton_compile_check.jobs([80, 90], list(triton_compile_check.DTYPES), cfg.CHECKED_HEAD_DIMS)
    # every padded width a head dim can run at is compiled, with and without the padding masks
    assert {cfg.padded_head_dim(D) for D in cfg.CHECKED_HEAD_DIMS} == {16, 32, 64, 128, 256}
    assert any(D != cfg.padded_head_dim(D) for D in cfg.CHECKED_HEAD_DIMS if D > 128)
    for kernel in cfg.KERNELS:
        for arch in (80, 90):
            for dtype in ("fp16", "bf16", "fp32"):
                for D in cfg.CHECKED_HEAD_DIMS:
                    for dropout in (False, True):
                        for grouped in (False, True):
                            checked = [j.config for j in jobs if not j.options and (
                                j.kernel, j.arch, j.dtype, j.head_dim, j.dropout, j.grouped) == (
                                kernel, arch, dtype, D, dropout, grouped)]
                            # grouped-query (GROUP > 1): dK/dV, which loops over the group, at each list's widest D
                            wanted = not grouped or (kernel == "bwd_dkdv" and D in triton_compile_check.GROUPED_HEAD_DIMS)
                            shipped = cfg.configs(kernel, (arch // 10, 0), cfg.padded_head_dim(D), dtype == "fp32", grouped)
                            assert checked == (shipped if wanted else []), (kernel, arch, dtype, D, dropout, grouped)
    assert {cfg.padded_head_dim(D) for D in triton_compile_check.GROUPED_HEAD_DIMS} == {64, 128, 256}


def test_jobs_cover_every_option_variant_at_the_option_head_dims():
    # each option a compile-time switch: each alone and all at once, every shipped config of every
    # kernel it changes (sinks: the forward only), with and without dropout, on both archs
    jobs = triton_compile_check.jobs([80, 90], list(triton_compile_check.DTYPES), cfg.CHECKED_HEAD_DIMS)
    variants = triton_compile_check.OPTION_VARIANTS
    assert {o for v in variants for o in v} == {"bidirectional", "window", "softcap", "sinks", "alibi"}
    assert any(len(v) == 5 for v in variants)
    assert set(triton_compile_check.OPTION_HEAD_DIMS) == {64, 128}
    for options in variants:
        for kernel in cfg.KERNELS:
            for arch in (80, 90):
                for D in cfg.CHECKED_HEAD_DIMS:
                    for dropout in (False, True):
                        checked = [j.config for j in jobs if (j.options, j.kernel, j.arch, j.head_dim, j.dropout)
                                   == (options, kernel, arch, D, dropout)]
                        wanted = D in triton_compile_check.OPTION_HEAD_DIMS and (
                            options != ("sinks",) or kernel.startswith("fwd"))
                        banded = bool({"bidirectional", "window"} & set(options))
                        shipped = cfg.configs(kernel, (arch // 10, 0), cfg.padded_head_dim(D), banded=banded)
                        assert checked == (shipped if wanted else []), (options, kernel, arch, D, dropout)


def test_jobs_cover_the_paged_forward_at_the_option_head_dims():
    # a paged cache switches the forward only (inference: no dropout), every shipped config of both
    # forward kernels, alone in fp16 and fp32 and with every option in fp16
    jobs = triton_compile_check.jobs([80, 90], list(triton_compile_check.DTYPES), cfg.CHECKED_HEAD_DIMS)
    paged = [j for j in jobs if "paged" in j.options]
    assert {j.kernel for j in paged} == {"fwd", "fwd_decode"} and not any(j.dropout for j in paged)
    for dtype, variants in triton_compile_check.PAGED_VARIANTS.items():
        for options in variants:
            assert "varlen" in options
            for kernel in ("fwd", "fwd_decode"):
                for arch in (80, 90):
                    for D in triton_compile_check.OPTION_HEAD_DIMS:
                        checked = [j.config for j in paged if (j.options, j.kernel, j.arch, j.dtype, j.head_dim)
                                   == (options, kernel, arch, dtype, D)]
                        banded = bool({"bidirectional", "window"} & set(options))
                        shipped = cfg.configs(kernel, (arch // 10, 0), cfg.padded_head_dim(D), dtype == "fp32",
                                              banded=banded)
                        assert checked == shipped, (options, kernel, arch, dtype, D)
    assert {dtype for dtype in triton_compile_check.PAGED_VARIANTS} == {"fp16", "fp32"}


def test_option_jobs_compile_with_their_switches_and_arguments():
    # an option job's kernel gets its switches as constexprs and its tensors as pointers; the plain
    # job's stay off and None, so it compiles the kernel it always did (in a compiling process)
    code = ("import json\n"
            "from fastgpt.verify.triton_compile import Job, _source\n"
            "from fastgpt.kernels.flash_attention_configs import KernelConfig\n"
            "everything = ('bidirectional', 'window', 'softcap', 'sinks', 'alibi')\n"
            "def seen(kernel, options):\n"
            "    s = _source(Job(kernel, 80, 'fp16', 64, True, KernelConfig(64, 64, 4, 3), options=options))\n"
            "    names = s.fn.arg_names\n"
            "    switches = {n: s.constants[(names.index(n),)] for n in ('BANDED', 'SOFTCAP', 'ALIBI', 'SINKS') if n in names}\n"
            "    return {'switches': switches, 'Sinks': s.signature.get('Sinks'), 'Alibi': s.signature['Alibi']}\n"
            "def paging(options):\n"
            "    s = _source(Job('fwd_decode', 90, 'fp16', 64, False, KernelConfig(16, 64, 4, 2), options=options))\n"
            "    return [s.constants[(s.fn.arg_names.index('PAGED'),)], s.signature['Block_table']]\n"
            "print(json.dumps([seen('fwd', ()), seen('fwd', everything), seen('bwd_dq', everything),\n"
            "                  paging(()), paging(('varlen', 'paged'))]))\n")
    out = subprocess.run([sys.executable, "-c", code], env=_compiler_env(), capture_output=True, text=True, timeout=300)
    plain, full, backward, unpaged, paged = json.loads(out.stdout.splitlines()[-1])
    assert unpaged == [False, "constexpr"] and paged == [True, "*i32"]
    assert plain == {"switches": dict.fromkeys(("BANDED", "SOFTCAP", "ALIBI", "SINKS"), False),
                     "Sinks": "constexpr", "Alibi": "constexpr"}
    assert full == {"switches": dict.fromkeys(("BANDED", "SOFTCAP", "ALIBI", "SINKS"), True),
                    "Sinks": "*fp16", "Alibi": "*fp32"}
    # the backward takes no SINKS: it reads the sinks in the forward's lse
    assert backward == {"switches": dict.fromkeys(("BANDED", "SOFTCAP", "ALIBI"), True), "Sinks": None, "Alibi": "*fp32"}


def test_a_spilling_config_fails_the_check():
    # dK/dV with 64×64 blocks on 4 warps is the kind of "obvious" config that spills on sm_80
    code = ("from fastgpt.verify.triton_compile import Job, run_job\n"
            "from fastgpt.kernels.flash_attention_configs import KernelConfig\n"
            "r = run_job(Job('bwd_dkdv', 80, 'fp16', 64, True, KernelConfig(64, 64, 4, 2)))\n"
            "print(r.registers, r.spill_bytes, r.ok, r.error)\n")
    out = subprocess.run([sys.executable, "-c", code], env=_compiler_env(), capture_output=True, text=True, timeout=600)
    registers, spills, ok, error = out.stdout.split()[-4:]
    assert error == "None" and int(spills) > 0 and ok == "False", out.stdout + out.stderr


def test_static_check_passes_for_every_shipped_config(tmp_path):
    returncode, stdout, _ = _full_check(tmp_path)
    assert returncode == 0, stdout[-10000:]
    assert " 0 failed" in stdout
    for kernel in ("fwd", "fwd_decode", "bwd_dkdv", "bwd_dq", "bwd_preprocess"):
        for arch in ("sm_80", "sm_90"):
            assert any(line.startswith(kernel) and arch in line for line in stdout.splitlines()), (kernel, arch)
    # dropout draws eight weights per 10-round Philox call: at most 10/8 rounds per weight in the PTX,
    # or 10/w where a thread holds only w < 8 weights of a tile (one call per weight, as the kernels
    # once drew, counts 7 to 10 here)
    lines = stdout.splitlines()
    assert lines[0].split()[-2:] == ["philox/w", "status"]
    # the option variants' rows too ("fwd+window"): a band walks three copies of the loop, which the count takes
    rows = [line.split() for line in lines[1:] if line.split() and line.split()[0].split("+")[0] in cfg.KERNELS]
    assert any("+" in row[0] for row in rows)
    assert rows
    for row in rows:
        if row[-2] == "-":  # no dropout compiled: only the paged forward, which serves inference
            assert "+paged" in row[0], row
            continue
        block_m, block_n, warps = (int(x[1:]) for x in row[3].split("/")[:3])  # M128/N64/w8/s3
        weights_per_thread = block_m * block_n / (32 * warps)
        assert 0.5 < float(row[-2]) <= 10 / min(8, weights_per_thread), row


def test_a_head_dim_outside_the_kernels_range_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        triton_compile_check.main(["--head-dim", "300"])
    assert "300 is outside the Triton kernels' head dims, 16..256" in capsys.readouterr().err


@pytest.mark.parametrize("jobs", ["0", "-2", "two"])
def test_jobs_below_one_are_refused_in_one_line(jobs, capsys):
    from fastgpt.cli import main as fastgpt_main

    for run in (triton_compile_check.main, lambda argv: fastgpt_main(["check", *argv])):
        with pytest.raises(SystemExit) as exit_info:
            run([f"--jobs={jobs}"])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"--jobs: {jobs!r} is not an integer >= 1" in error, error


def test_the_kernels_cache_key_is_the_same_in_every_process():
    # Triton's on-disk cache (what makes a second check, or a GPU run's second process, skip the
    # compiler) is found by this key: nothing in it may depend on the process, such as an address
    code = ("from fastgpt.kernels import flash_attention_ops as ops\n"
            "print(sorted({k: f.cache_key for k, f in ops._KERNELS.items()}.items()))\n")
    keys = [subprocess.run([sys.executable, "-c", code], env=_compiler_env(), capture_output=True, text=True,
                           timeout=120).stdout for _ in range(2)]
    assert keys[0] and keys[0] == keys[1], keys


def test_the_record_is_the_check_of_these_kernel_sources():
    record = _record()
    assert record is not None, f"{RECORD} is missing: write it with `{REFRESH}`"
    recorded, key = record[0].get("key") or {}, triton_compile_check.record_key(*FULL_CHECK)
    if (recorded.get("triton"), recorded.get("compiler_env")) != (key["triton"], key["compiler_env"]):
        pytest.skip(f"the record was compiled by triton {recorded.get('triton')} with compiler environment "
                    f"{recorded.get('compiler_env')}, not triton {key['triton']} with {key['compiler_env']}: "
                    "the full check compiles here instead")
    assert recorded["sources"] == key["sources"], (
        f"the kernels or their compile check changed since {RECORD.relative_to(REPO)} was written; the full check "
        f"compiled them in this run. Refresh the record from the checkout's root (Triton's cache makes it quick "
        f"after this run): `{REFRESH}`")


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a name inside a module, not a submodule
        return False


def test_the_key_covers_every_fastgpt_module_the_check_compiles_from():
    for name in triton_compile_check.KEYED_MODULES:
        imported = set()
        for node in ast.walk(ast.parse(Path(importlib.util.find_spec(name).origin).read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fastgpt":
                # `from fastgpt.kernels import flash_attention_configs` names a module, `from
                # fastgpt.kernels.flash_attention import loop_bound` a name inside one
                for alias in node.names:
                    inner = f"{node.module}.{alias.name}"
                    imported.add(inner if _is_module(inner) else node.module)
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name.split(".")[0] == "fastgpt"}
        assert imported <= set(triton_compile_check.KEYED_MODULES), (name, imported - set(triton_compile_check.KEYED_MODULES))


def test_the_key_follows_the_triton_version_the_compiler_environment_and_what_is_checked(monkeypatch):
    key = triton_compile_check.record_key(*FULL_CHECK)
    assert key == triton_compile_check.record_key(*FULL_CHECK)
    assert key["sources"] != triton_compile_check.record_key([80], *FULL_CHECK[1:])["sources"]
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the check undoes it: not a compiler setting
    monkeypatch.setenv("TRITON_CACHE_DIR", "/elsewhere")
    assert triton_compile_check.record_key(*FULL_CHECK) == key
    monkeypatch.setenv("TRITON_PTXAS_PATH", "/opt/other/ptxas")
    assert triton_compile_check.record_key(*FULL_CHECK)["compiler_env"]["TRITON_PTXAS_PATH"] == "/opt/other/ptxas"
    monkeypatch.setattr(triton_compile_check.importlib.metadata, "version", lambda name: "0.0")
    assert triton_compile_check.record_key(*FULL_CHECK)["triton"] == "0.0"
