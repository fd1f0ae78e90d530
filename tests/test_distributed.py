"""attnmerge.distributed: the context-parallel combine over real process groups.

``cp_combine`` runs in Gloo groups of 2, 3 and 4 CPU processes spawned here. Starting a
process costs seconds, so each world size starts one group and runs every case of
``cases(world)`` in it: all three distributions, uneven token counts (``T < W``,
``T = 0``), ranks without keys, special LSEs (+-inf, NaN, values far apart), NaN rows
where a partial has no weight, every output format, ``[H, T]``, ``[T, H]`` and padded
LSE views, given or new outputs, in place, base 2, the default group, subgroups (a
rank's group rank differs from its global rank), vLLM's ``GroupCoordinator`` and vLLM's
signatures. Each rank builds every rank's partials from the case's seed, so it can
compute the single-process ``attnmerge.merge`` of all of them stacked in rank order,
restricted to its slice, and compare its own result with it bit for bit (output,
LSE, scales, amax); the ranks send their failures back to the test.

Argument checks need no collective: they run in the test process with a stand-in group.
A world of one also runs in the test process (no collective is made for one rank).
GPU tests (marked ``gpu``) run one rank on NCCL with the GPU kernels, and a group of
up to four GPUs with a CUDA-graph replay.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from utils import FP8, INF, NAN, ON_GPU, assert_bits_equal, lse_values

import attnmerge
import attnmerge.distributed as amd
from attnmerge.distributed import SCATTERS, cp_combine, token_slice

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: Output formats by name: (constructor of a fresh format for a slice [T, H, D], head
#: size the case needs or None).
QUANTS = {
    None: (lambda T, dev: None, None),
    "plain_f32": (lambda T, dev: attnmerge.Plain(torch.float32), None),
    "plain_bf16_amax": (
        lambda T, dev: attnmerge.Plain(torch.bfloat16, amax=torch.empty(1, device=dev)),
        None,
    ),
    "fp8_static": (lambda T, dev: attnmerge.FP8Static(torch.tensor([0.02], device=dev)), None),
    "fp8_token": (lambda T, dev: attnmerge.FP8PerToken(), None),
    "fp8_token_ub_scales": (
        lambda T, dev: attnmerge.FP8PerToken(
            scale_ub=torch.tensor([3.0], device=dev), scales=torch.empty(T, device=dev)
        ),
        None,
    ),
    "fp8_group64": (lambda T, dev: attnmerge.FP8PerTokenGroup(64), 64),
    "fp8_group64_tma_amax": (
        lambda T, dev: attnmerge.FP8PerTokenGroup(
            64, layout="col_major_tma", amax=torch.empty(1, device=dev)
        ),
        64,
    ),
    "fp8_group128_packed": (
        lambda T, dev: attnmerge.FP8PerTokenGroup(128, ue8m0=True, layout="ue8m0_packed"),
        128,
    ),
}


def cases(world: int) -> list[dict]:
    """The cases run in a group of ``world`` ranks (plain dicts: they go to the workers)."""
    out: list[dict] = []

    def add(**kw):
        case = dict(
            scatter="head",
            T=7,
            H=None,
            D=16,
            dtype="bfloat16",
            quant=None,
            lse="mixed",
            lse_layout="ht",
            base="e",
            out="new",
            ret=True,
            group="world",
            api="cp_combine",
            empty_rank=None,
        )
        case.update(kw)
        if case["H"] is None:
            case["H"] = 2 * world if case["scatter"] == "head" else 3
        case["seed"] = 1000 * world + len(out)
        case["id"] = f"{len(out)}:" + ",".join(f"{k}={v}" for k, v in kw.items())
        out.append(case)

    for scatter in SCATTERS:
        for T in sorted({0, 1, world - 1, world + 1, 2 * world + 1, 8}):
            add(scatter=scatter, T=T)  # uneven T, T < W, T = 0
        add(scatter=scatter, dtype="float32")
        add(scatter=scatter, dtype="float16", D=5)  # odd rows: LSEs still aligned
        add(scatter=scatter, dtype="bfloat16", D=1, T=3)
        for quant, (_, head_size) in QUANTS.items():
            if quant is not None:
                add(scatter=scatter, quant=quant, D=head_size or 16, T=world + 2)
        add(scatter=scatter, lse_layout="th")
        add(scatter=scatter, lse_layout="padded", dtype="float16")
        add(scatter=scatter, lse="normal", empty_rank=world - 1)  # a rank without keys
        add(scatter=scatter, lse="normal", empty_rank=0, T=3)
        add(scatter=scatter, lse="specials")  # only +-inf, NaN and values far apart
        add(scatter=scatter, lse="empty")  # no rank has keys: 0 and -inf everywhere
        add(scatter=scatter, base=2)
        add(scatter=scatter, out="given")  # strided out and out_lse
        add(scatter=scatter, out="given", quant="fp8_static", lse_layout="th")
        add(scatter=scatter, ret=False)
        add(scatter=scatter, group="default")
        add(scatter=scatter, group="coordinator", lse_layout="th")
        if world == 4:
            add(scatter=scatter, group="sub")  # ranks {0, 2} and {1, 3}
            add(scatter=scatter, group="sub", quant="fp8_token", T=3)
    add(scatter="none", out="inplace")
    add(scatter="none", out="inplace", dtype="float32", lse_layout="th")
    for api in ("vllm_rs", "vllm_ar"):
        add(api=api, lse_layout="th")
        add(api=api, lse_layout="th", ret=False, base=2)
        add(api=api, lse_layout="th", T=6, lse="normal", masked=True)
    add(api="vllm_rs", lse_layout="th", T=1, lse="normal", masked="none_local")
    return out


# ---------------------------------------------------------------------------
# One case, on one rank.


def shard(case: dict, world: int, rank: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s partials: the output ``[T, H, D]`` (in its own padded storage) and
    LSE ``[H, T]`` values; every rank draws all of them from the case's seed."""
    gen = torch.Generator().manual_seed(case["seed"] * 97 + rank)
    T, H, D = case["T"], case["H"], case["D"]
    rows = torch.randn(T, H, D, generator=gen) * 2
    pattern = {"specials": ("neg_inf", "pos_inf", "nan", "huge", "big_neg", "wide")}.get(
        case["lse"], case["lse"]
    )
    lse = lse_values(H, T, "neg_inf" if pattern == "empty" else pattern, gen)
    if case["empty_rank"] == rank:
        lse.fill_(-INF if rank % 2 else INF)
    rows[lse.isinf().t()] = NAN  # a partial without weight: its row is not read
    storage = torch.full((T, H + 1, D + 3), NAN, dtype=DTYPES[case["dtype"]], device=device)
    partial = storage[:, 1:, 2 : D + 2]  # padded strides
    partial.copy_(rows)
    return partial, lse.to(device)


def lse_view(lse: torch.Tensor, layout: str) -> torch.Tensor:
    """The ``[H, T]`` LSE as passed: stored ``[H, T]``, ``[T, H]`` (``.t()``) or padded."""
    H, T = lse.shape
    if layout == "th":
        return lse.t().contiguous().t()
    if layout == "padded":
        return torch.full((H + 2, 2 * T + 1), NAN, device=lse.device)[1 : H + 1, 1::2].copy_(lse)
    return lse.clone()


def vllm_mask(case: dict, rank: int, T: int):
    """(seq_lens, query_start_loc) of rank ``rank``, and the rows they mark empty."""
    starts = [0, 2, 3, T - 1] if T >= 4 else [0, T]
    lens = [(rank + s) % 3 for s in range(len(starts) - 1)]  # some ranks hold nothing
    if case["masked"] == "none_local":
        return torch.zeros(0, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), list(range(T))
    empty = [t for t in range(T) if t >= starts[-1]]
    empty += [t for s in range(len(lens)) for t in range(starts[s], starts[s + 1]) if lens[s] == 0]
    return torch.tensor(lens), torch.tensor(starts), empty


def local_slices(case: dict, world: int, rank: int) -> tuple[slice, slice]:
    T, H = case["T"], case["H"]
    scatter = {"vllm_rs": "head", "vllm_ar": "none"}.get(case["api"], case["scatter"])
    if scatter == "head":
        return slice(0, T), slice(rank * H // world, (rank + 1) * H // world)
    if scatter == "token":
        return token_slice(T, world, rank), slice(0, H)
    return slice(0, T), slice(0, H)


def run_case(case: dict, world: int, rank: int, group, device) -> None:
    """Run the case on this rank and compare with the single-process merge."""
    shards = [shard(case, world, r, device) for r in range(world)]
    if case.get("masked"):
        for r, (_, lse) in enumerate(shards):
            lse[:, vllm_mask(case, r, case["T"])[2]] = -INF
    ts, hs = local_slices(case, world, rank)
    T_loc, H_loc = ts.stop - ts.start, hs.stop - hs.start
    make_quant = QUANTS[case["quant"]][0]
    base = "e" if case["base"] == "e" else 2
    backend = "auto" if case.get("backend_auto") else "torch"
    stacked = torch.stack([o for o, _ in shards])[:, ts, hs]
    stacked_lse = torch.stack([lse for _, lse in shards])[:, hs, ts]
    expected_quant = make_quant(T_loc, device)
    expected = attnmerge.merge(
        stacked, stacked_lse, quant=expected_quant, lse_base=base, return_lse=True, backend=backend
    )

    partial_out, lse = shard(case, world, rank, device)
    partial_lse = lse_view(lse, case["lse_layout"])
    kw = {"backend": backend, "lse_base": base, "return_lse": case["ret"]}
    if case["api"] != "cp_combine":
        os.environ["ATTNMERGE_BACKEND"] = backend  # vLLM's signature has no backend
        masks = vllm_mask(case, rank, case["T"])[:2] if case.get("masked") else (None, None)
        fn = amd.cp_lse_ag_out_rs if case["api"] == "vllm_rs" else amd.cp_lse_ag_out_ar
        res = fn(partial_out, partial_lse.t(), group, None, case["ret"], base == "e", *masks)
        output, out_lse = res if case["ret"] else (res, None)
        assert_bits_equal(output, expected.output, "output")
        if case["ret"]:
            assert_bits_equal(out_lse.t(), expected.lse, "lse")
            assert out_lse.is_contiguous()
        return
    quant = make_quant(T_loc, device)
    if case["out"] == "given":
        dtype = quant.dtype if quant is not None else partial_out.dtype
        store = torch.zeros(T_loc, H_loc + 2, case["D"] + 1, device=device).to(dtype)
        kw["out"] = store[:, 1 : H_loc + 1, : case["D"]]
        kw["out_lse"] = torch.zeros(T_loc, H_loc + 1, device=device)[:, :H_loc].t()
    elif case["out"] == "inplace":  # the partials are copied out before anything is written
        kw["out"], kw["out_lse"] = partial_out, partial_lse
    res = cp_combine(partial_out, partial_lse, group, scatter=case["scatter"], quant=quant, **kw)
    assert_bits_equal(res.output, expected.output, "output")
    if "out" in kw:
        assert res.output is kw["out"]
    if case["ret"] or case["out"] in ("given", "inplace"):
        assert_bits_equal(res.lse, expected.lse, "lse")
        if case["lse_layout"] == "th" and case["out"] == "new":
            assert res.lse.stride(0) == 1, "a [T, H]-stored input gives a [T, H]-stored LSE"
    else:
        assert res.lse is None
    if expected.scales is not None:
        assert_bits_equal(res.scales, expected.scales, "scales")
    if getattr(quant, "amax", None) is not None:
        assert_bits_equal(quant.amax, expected_quant.amax, "amax")


# ---------------------------------------------------------------------------
# The spawned groups.


def _worker(rank, world, path, backend, device, case_list, queue) -> None:
    torch.set_num_threads(1)
    dev = torch.device(device, rank) if device == "cuda" else torch.device(device)
    if device == "cuda":
        torch.cuda.set_device(dev)
    failures = {}
    try:
        dist.init_process_group(
            backend,
            init_method=f"file://{path}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        groups = {
            "world": dist.group.WORLD,
            "default": None,
            "coordinator": SimpleNamespace(device_group=dist.group.WORLD),
        }
        if world == 4:
            evens, odds = dist.new_group([0, 2]), dist.new_group([1, 3])
            groups["sub"] = evens if rank % 2 == 0 else odds
        for case in case_list:
            group = groups[case["group"]]
            size = world if case["group"] != "sub" else 2
            group_rank = rank if case["group"] != "sub" else rank // 2
            try:
                if case.get("graph"):
                    run_graph_case(case, size, group_rank, group, dev)
                else:
                    run_case(case, size, group_rank, group, dev)
            except Exception:
                failures[case["id"]] = traceback.format_exc(limit=4)
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        failures["(group)"] = traceback.format_exc()
    queue.put((rank, failures))


def run_group(world: int, case_list: list[dict], tmp_path, backend="gloo", device="cpu") -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    path = tmp_path / f"store-{world}"
    args = (world, str(path), backend, device, case_list, queue)
    procs = [ctx.Process(target=_worker, args=(r, *args)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        reports = dict(queue.get(timeout=240) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    failed = {(r, cid): msg for r, f in sorted(reports.items()) for cid, msg in f.items()}
    if failed:
        lines = [f"rank {r}, case {cid}:\n{msg}" for (r, cid), msg in list(failed.items())[:4]]
        pytest.fail(
            f"{len(failed)} failures of {len(case_list)} cases x {world} ranks\n" + "\n".join(lines)
        )


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gloo_group(world, tmp_path):
    run_group(world, cases(world), tmp_path)


def test_case_list_covers_the_issue():
    ids = [c for w in (2, 3, 4) for c in cases(w)]
    assert {c["scatter"] for c in ids} == set(SCATTERS)
    assert {c["quant"] for c in ids} == set(QUANTS)
    assert {0, 1} <= {c["T"] for c in ids}
    assert len(ids) > 200


# ---------------------------------------------------------------------------
# The token split.


@pytest.mark.parametrize("T", [0, 1, 3, 5, 8, 9, 17])
@pytest.mark.parametrize("W", [1, 2, 3, 4, 8])
def test_token_slice_is_torch_chunk(T, W):
    x = torch.arange(T)
    pieces = [x[token_slice(T, W, r)] for r in range(W)]
    chunks = list(torch.chunk(x, W)) if T else []
    assert [p.tolist() for p in pieces[: len(chunks)]] == [c.tolist() for c in chunks]
    assert all(p.numel() == 0 for p in pieces[len(chunks) :])
    assert torch.equal(torch.cat(pieces), x)


# ---------------------------------------------------------------------------
# One rank, in this process.


class FakeGroup:
    """A group of ``size`` ranks that must never be used for a collective."""

    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize("scatter", SCATTERS)
@pytest.mark.parametrize("quant", [None, "fp8_static", "fp8_token", "fp8_group64"])
def test_world_of_one(scatter, quant):
    case = dict(
        scatter=scatter,
        T=5,
        H=3,
        D=64,
        dtype="bfloat16",
        quant=quant,
        lse="mixed",
        lse_layout="th",
        base="e",
        out="new",
        ret=True,
        api="cp_combine",
        empty_rank=None,
        seed=7,
    )
    run_case(case, 1, 0, FakeGroup(1), "cpu")


def test_world_of_one_default_group(tmp_path, monkeypatch):
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    monkeypatch.setenv("ATTNMERGE_BACKEND", "torch")  # vLLM's signature has no backend
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        for scatter in SCATTERS:
            case = dict(
                scatter=scatter,
                T=4,
                H=2,
                D=8,
                dtype="float16",
                quant=None,
                lse="mixed",
                lse_layout="ht",
                base="e",
                out="new",
                ret=True,
                api="cp_combine",
                empty_rank=None,
                seed=3,
            )
            run_case(case, 1, 0, None, "cpu")
        res = amd.cp_lse_ag_out_rs(
            torch.ones(2, 4, 8), torch.zeros(2, 4), dist.group.WORLD, return_lse=True
        )
        assert res[0].shape == (2, 4, 8) and res[1].shape == (2, 4)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------
# Rejected arguments: before anything is sent (a stand-in group) or written.

T, H, D = 5, 4, 16


def _args(**kw):
    g = torch.Generator().manual_seed(0)
    args = {
        "partial_out": torch.randn(T, H, D, generator=g),
        "partial_lse": torch.randn(H, T, generator=g),
        "group": FakeGroup(2),
    }
    args.update(kw)
    return args


REJECTED = [
    ("partial_out", dict(partial_out=[1.0]), TypeError),
    ("partial_out", dict(partial_out=torch.zeros(T, H)), ValueError),
    ("partial_out", dict(partial_out=torch.zeros(T, H, D, dtype=torch.int32)), TypeError),
    ("partial_lse", dict(partial_lse=torch.zeros(H, T, dtype=torch.float16)), TypeError),
    ("partial_lse", dict(partial_lse=torch.zeros(H, T, dtype=torch.float64)), TypeError),
    (r"partial_lse.*lse\.t\(\)", dict(partial_lse=torch.zeros(T, H)), ValueError),
    ("partial_lse", dict(partial_lse=torch.zeros(H, T, device="meta")), ValueError),
    ("partial_lse", dict(partial_lse=None), TypeError),
    ("scatter", dict(scatter="heads"), ValueError),
    ("multiple of the world size 3", dict(group=FakeGroup(3)), ValueError),
    ("group", dict(group=object()), TypeError),
    ("quant", dict(quant="fp8"), TypeError),
    ("lse_base", dict(lse_base=10), ValueError),
    ("backend", dict(backend="cudnn"), ValueError),
    (r"out must have shape \(5, 2, 16\)", dict(out=torch.zeros(T, H, D)), ValueError),
    ("out", dict(out=torch.zeros(T, 2, D, dtype=torch.int8)), TypeError),
    ("FP8", dict(out=torch.zeros(T, 2, D).to(FP8)), ValueError),
    ("out", dict(out=torch.zeros(T, 2, D), quant=attnmerge.FP8Static(torch.ones(1))), TypeError),
    ("out", dict(out=torch.zeros(T, 2, 2 * D)[:, :, ::2]), ValueError),
    ("overlapping", dict(out=torch.zeros(1, 2, D).expand(T, 2, D)), ValueError),
    ("out", dict(out=torch.zeros(T, 2, D, device="meta")), ValueError),
    ("out_lse", dict(out_lse=torch.zeros(4, T)), ValueError),
    ("out_lse", dict(out_lse=torch.zeros(2, T, dtype=torch.float16)), TypeError),
    (
        "output_scale",
        dict(quant=attnmerge.FP8Static(torch.ones(1, dtype=torch.float16))),
        TypeError,
    ),
    ("output_scale", dict(quant=attnmerge.FP8Static(torch.ones(2))), ValueError),
    (
        "group_size",
        dict(quant=attnmerge.FP8PerTokenGroup(64), partial_out=torch.zeros(T, H, 8)),
        ValueError,
    ),
    ("scales", dict(quant=attnmerge.FP8PerToken(scales=torch.zeros(T + 1))), ValueError),
    ("amax", dict(quant=attnmerge.Plain(torch.float32, amax=torch.zeros(2))), ValueError),
]


@pytest.mark.parametrize(
    ("match", "change", "exc"),
    REJECTED,
    ids=[f"{i}-{','.join(c)}" for i, (_, c, _) in enumerate(REJECTED)],
)
def test_rejected(match, change, exc):
    args = _args(**change)
    written = [args.get("out"), args.get("out_lse")]
    written = [(t, t.clone()) for t in written if isinstance(t, torch.Tensor) and t.is_cpu]
    with pytest.raises(exc, match=match):
        cp_combine(**args)
    for t, before in written:
        assert torch.equal(t.float(), before.float()), "written, then raised"


def test_rejected_token_slice_shape():
    # rank 1 of 2 with T = 5 gets tokens 3..4: out must be [2, H, D]
    with pytest.raises(ValueError, match=r"out must have shape \(2, 4, 16\)"):
        cp_combine(**_args(group=FakeGroup(2, 1)), scatter="token", out=torch.zeros(3, H, D))


def test_rejected_default_group_without_init():
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(ValueError, match="group=None"):
        cp_combine(torch.zeros(T, H, D), torch.zeros(H, T))


@pytest.mark.parametrize(
    ("match", "change"),
    [
        ("together", dict(seq_lens=torch.ones(2, dtype=torch.int32))),
        ("together", dict(query_start_loc=torch.tensor([0, 2, 5]))),
        ("1-D", dict(seq_lens=torch.ones(2, 1), query_start_loc=torch.tensor([0, 2, 5]))),
        ("one more", dict(seq_lens=torch.ones(2), query_start_loc=torch.tensor([0, 5]))),
        ("cp_attn_lse", dict(cp_attn_lse=torch.zeros(T, H, 2))),
        ("cp_attn_out", dict(cp_attn_out=None)),
    ],
)
def test_vllm_rejected(match, change):
    args = {
        "cp_attn_out": torch.zeros(T, H, D),
        "cp_attn_lse": torch.zeros(T, H),
        "cp_group": FakeGroup(2),
        **change,
    }
    with pytest.raises(ValueError if "cp_attn_out" not in change else TypeError, match=match):
        amd.cp_lse_ag_out_rs(**args)


def test_vllm_signature_matches():
    """The wrapper's parameters are vLLM 0.34.0's ``cp_lse_ag_out_rs``'s, in order."""
    import inspect

    names = [
        "cp_attn_out",
        "cp_attn_lse",
        "cp_group",
        "ctx",
        "return_lse",
        "is_lse_base_on_e",
        "seq_lens",
        "query_start_loc",
    ]
    for fn in (amd.cp_lse_ag_out_rs, amd.cp_lse_ag_out_ar):
        params = inspect.signature(fn).parameters
        assert list(params) == names
        assert params["return_lse"].default is False and params["is_lse_base_on_e"].default


# ---------------------------------------------------------------------------
# The example.


def test_example_runs():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "ATTNMERGE_BACKEND": "torch"}
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "cp_attention.py"),
        "--world",
        "2",
        "--tokens",
        "5",
        "--keys",
        "37",
        "--heads",
        "4",
        "--head-size",
        "16",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "max error" in done.stdout


# ---------------------------------------------------------------------------
# GPUs (NCCL and the GPU kernels).


def run_graph_case(case: dict, world: int, rank: int, group, device) -> None:
    """Capture cp_combine in a CUDA graph, replay it on new partials, compare with the
    eager result of the same partials."""
    partial_out, lse = shard(case, world, rank, device)
    static_out, static_lse = partial_out.clone(), lse.clone()
    kw = dict(scatter=case["scatter"], backend="auto", return_lse=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        cp_combine(static_out, static_lse, group, **kw)  # warm-up: kernels built
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = cp_combine(static_out, static_lse, group, **kw)
    new_case = {**case, "seed": case["seed"] + 1}
    new_out, new_lse = shard(new_case, world, rank, device)
    static_out.copy_(new_out)
    static_lse.copy_(new_lse)
    graph.replay()
    eager = cp_combine(new_out, new_lse, group, **kw)
    torch.cuda.synchronize()
    assert_bits_equal(captured.output, eager.output, "graph output")
    assert_bits_equal(captured.lse, eager.lse, "graph lse")


def gpu_cases(world: int) -> list[dict]:
    out = []
    for case in cases(world):
        if case["group"] == "default" or case["api"] != "cp_combine":
            continue
        out.append({**case, "backend_auto": True})
    for scatter in SCATTERS:
        out.append(
            {
                **out[0],
                "scatter": scatter,
                "graph": True,
                "H": 2 * world,
                "T": 9,
                "id": f"graph:{scatter}",
                "quant": None,
            }
        )
    return out


@pytest.mark.gpu
def test_nccl_world_of_one_gpu_kernels(tmp_path):
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        for scatter in SCATTERS:
            for quant in (None, "fp8_static"):
                case = dict(
                    scatter=scatter,
                    T=67,
                    H=4,
                    D=128,
                    dtype="bfloat16",
                    quant=quant,
                    lse="mixed",
                    lse_layout="ht",
                    base="e",
                    out="new",
                    ret=True,
                    api="cp_combine",
                    empty_rank=None,
                    seed=11,
                )
                partial_out, lse = shard(case, 1, 0, "cuda")
                q = QUANTS[quant][0](67, "cuda")
                got = cp_combine(partial_out, lse, None, scatter=scatter, quant=q, return_lse=True)
                want = attnmerge.merge(partial_out[None], lse[None], quant=q, return_lse=True)
                assert_bits_equal(got.output, want.output, "output")
                assert_bits_equal(got.lse, want.lse, "lse")
        run_graph_case({**case, "quant": None}, 1, 0, None, torch.device("cuda"))
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_nccl_group(tmp_path):
    world = min(torch.cuda.device_count(), 4) if ON_GPU else 0
    if world < 2:
        pytest.skip("needs two GPUs")
    run_group(world, gpu_cases(world), tmp_path, backend="nccl", device="cuda")
