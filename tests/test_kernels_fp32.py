"""The fp32 C kernels of the tanh recurrence (charrnn/kernels/fp32.py) against TanhRNNLayer's
fp32 path (MKL step by step): every variant this CPU runs, both layouts of W, tails, 1-3 threads."""
import os
import subprocess
import sys
import threading

import pytest
import torch

from charrnn.kernels import fp32
from charrnn.kernels.fused import TanhRNNLayer


def _kernel_or_skip(variant):
    ok, why = fp32._supported(variant)
    if not ok:
        pytest.skip(f"{variant}: {why}")
    k, why = fp32.load(variant)
    if k is None:                             # no compiler: CI installs one, so there it is a failure
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{variant} could not be built under CI: {why}")
        pytest.skip(f"{variant} could not be built here: {why}")
    return k


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The MKL reference on one thread: on a busy machine its OpenMP team is what would be slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=list(fp32.VARIANTS))
def variant(request):
    _kernel_or_skip(request.param)
    return request.param


def _close(got, want, what):
    # fp32 sums over up to steps*batch terms in another order: relative 1e-4, and absolute 1e-5
    # of the tensor's largest entry (at least 1e-5)
    atol = 1e-5 * max(1.0, want.abs().max().item())
    assert got.shape == want.shape, what
    assert torch.allclose(got, want, rtol=1e-4, atol=atol), \
        f"{what}: max abs error {(got - want).abs().max().item():.3g} (atol {atol:.3g})"


def _params(steps, batch, h, n_in, ids, transposed, seed=0):
    g = torch.Generator().manual_seed(seed)
    if ids:
        X = torch.randint(0, n_in, (steps, batch), generator=g)
    else:
        X = torch.randn(steps, batch, n_in, generator=g).requires_grad_()
    W_in = (torch.randn(n_in, h, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(h, generator=g) * 0.1).requires_grad_()
    H0 = (torch.randn(batch, h, generator=g) * 0.5).requires_grad_()
    W = torch.randn(h, h, generator=g) * (1.3 / h ** 0.5)
    if transposed:                        # nn.RNN's W_hh.t(): a transposed view of a leaf
        W_hh = W.t().contiguous().requires_grad_()
        W_used = W_hh.t()
    else:
        W_hh = W.requires_grad_()
        W_used = W_hh
    dHs = torch.randn(steps, batch, h, generator=g)
    return X, W_in, b, H0, W_hh, W_used, dHs


def _run(fn, X, W_in, b, H0, W_hh, W_used, dHs):
    leaves = [t for t in (X, W_in, b, H0, W_hh) if t.requires_grad]
    for t in leaves:
        t.grad = None
    Hs = fn(X, W_in, b, H0, W_used)
    (Hs * dHs).sum().backward()
    return Hs.detach().clone(), {name: t.grad.clone() for name, t in
                                 zip(("X", "W_in", "b", "H0", "W"), (X, W_in, b, H0, W_hh)) if t.requires_grad}


SHAPES = [  # steps, batch, h, vocab or inputs
    (5, 3, 37, 11),
    (35, 32, 512, 28),
    (35, 32, 256, 28),
    (1, 1, 1, 2),
    (4, 9, 70, 13),
    (3, 17, 100, 5),
]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True], ids=["W", "W^T view"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("ids", [True, False], ids=["ids", "floats"])
def test_matches_tanh_rnn_layer(variant, shape, transposed, threads, ids):
    steps, batch, h, n_in = shape
    args = _params(steps, batch, h, n_in, ids, transposed, seed=steps * 1000 + h)
    H_ref, g_ref = _run(lambda *a: TanhRNNLayer.apply(*a, False), *args)
    H_got, g_got = _run(lambda *a: fp32.TanhRNNFp32.apply(*a, variant, threads), *args)
    _close(H_got, H_ref, "Hs")
    _close(H_got[-1], H_ref[-1], "final state")
    assert g_got.keys() == g_ref.keys()
    for name in g_ref:
        _close(g_got[name], g_ref[name], f"grad of {name}")
    if transposed and h > 1:                 # the gradient keeps the transposed view's layout
        W_hh = args[4]
        assert W_hh.grad.stride() == W_hh.stride()


def test_book_loop(variant):
    """Against the seed's own loop, with autograd through every step."""
    steps, batch, h, V = 7, 5, 40, 12
    X, W_in, b, H0, W, _, dHs = _params(steps, batch, h, V, True, False, seed=3)
    Hs = fp32.tanh_rnn_layer_fp32(X, W_in, b, H0, W, variant, 2)
    (Hs * dHs).sum().backward()
    got = [Hs.detach()] + [t.grad.clone() for t in (W_in, b, H0, W)]
    for t in (W_in, b, H0, W):
        t.grad = None
    H, outs = H0, []
    for x_t in torch.nn.functional.one_hot(X, V).float():
        H = torch.tanh(x_t @ W_in + H @ W + b)
        outs.append(H)
    ref = torch.stack(outs)
    (ref * dHs).sum().backward()
    for g, r, name in zip(got, [ref.detach()] + [t.grad for t in (W_in, b, H0, W)], ["Hs", "W_in", "b", "H0", "W"]):
        _close(g, r, name)


def test_tanh_accuracy(variant):
    k = _kernel_or_skip(variant)
    x = torch.cat([torch.linspace(-12, 12, 400_001), torch.logspace(-30, 1.2, 20_001),
                   -torch.logspace(-30, 1.2, 20_001), torch.tensor([0.625, -0.625, 9.5, 30.0, 1e-40])])
    y = k.tanh_(x.clone())
    ref = torch.tanh(x.double())
    rel = ((y.double() - ref).abs() / ref.abs().clamp_min(1e-38))
    assert rel.max().item() < 2e-7, rel.max().item()
    special = k.tanh_(torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, 2.0, 3.0, 4.0]))
    assert special[0].isnan() and special[1].item() == 1.0 and special[2].item() == -1.0
    assert special[3].item() == 0.0 and special[4].item() == 0.0 and special[4].signbit()


def test_nan_propagates(variant):
    """A diverged run shows NaN, as the MKL path does: the kernel's tanh does not clamp it away."""
    X, W_in, b, H0, W, _, _ = _params(4, 3, 20, 6, True, False)
    with torch.no_grad():
        W_in[X[1, 0]] = float("nan")
        Hs = fp32.tanh_rnn_layer_fp32(X, W_in, b, H0, W, variant, 1)
    assert not Hs[0].isnan().any() and Hs[1:, 0].isnan().all()   # row 0 from step 1 on
    assert not Hs[:, 1:].isnan().any()                              # the other rows stay finite


def test_backward_kernel_direct(variant):
    """Loops.backward alone: dA and dH0 against the Python loop of TanhRNNLayer.backward."""
    k = _kernel_or_skip(variant)
    steps, batch, h = 6, 7, 45
    g = torch.Generator().manual_seed(1)
    Hs = torch.tanh(torch.randn(steps, batch, h, generator=g))
    dH = torch.randn(steps, batch, h, generator=g)
    W = torch.randn(h, h, generator=g) / h ** 0.5
    dA_ref = dH.clone()
    for t in range(steps - 1, -1, -1):
        dA_ref[t] *= 1 - Hs[t] * Hs[t]
        if t > 0:
            dA_ref[t - 1] += dA_ref[t] @ W.t()
    for threads in (1, 2):
        dA, dH0 = k.backward(dH, Hs, W, threads)
        _close(dA, dA_ref, "dA")
        _close(dH0, dA_ref[0] @ W.t(), "dH0")
        dA2, none = k.backward(dH, Hs, W, threads, dH0=False)
        assert none is None and torch.equal(dA2, dA)


def test_concurrent_calls_share_the_team(variant):
    """Two Python threads calling at once: one gets the team, the other runs alone; both right."""
    k = _kernel_or_skip(variant)
    steps, batch, h = 20, 16, 96
    g = torch.Generator().manual_seed(2)
    W = torch.randn(h, h, generator=g) / h ** 0.5
    H0 = torch.randn(batch, h, generator=g)
    A = torch.randn(steps, batch, h, generator=g)
    want = k.forward(A.clone(), H0, W, 1)
    errors = []

    def work():
        for _ in range(20):
            got = k.forward(A.clone(), H0, W, 2)
            if not torch.equal(got, want):
                errors.append((got - want).abs().max().item())

    workers = [threading.Thread(target=work) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not any(w.is_alive() for w in workers), "a call hung"
    assert not errors, errors


def test_thread_counts_do_not_change_results(variant):
    """Each output element is the same dot product in the same order on any number of threads."""
    k = _kernel_or_skip(variant)
    g = torch.Generator().manual_seed(4)
    steps, batch, h = 5, 13, 200
    W = torch.randn(h, h, generator=g) / h ** 0.5
    H0 = torch.randn(batch, h, generator=g)
    A = torch.randn(steps, batch, h, generator=g)
    one = k.forward(A.clone(), H0, W, 1)
    for threads in (2, 3, 8, 64):
        assert torch.equal(k.forward(A.clone(), H0, W, threads), one)


def test_bad_arguments(variant):
    k = _kernel_or_skip(variant)
    A, H0, W = torch.zeros(2, 3, 4), torch.zeros(3, 4), torch.zeros(4, 4)
    with pytest.raises(ValueError):
        k.forward(A.double(), H0, W)
    with pytest.raises(ValueError):
        k.forward(A, torch.zeros(3, 5), W)
    with pytest.raises(ValueError):
        k.forward(A, H0, torch.zeros(4, 5))
    with pytest.raises(ValueError):
        k.forward(A.transpose(0, 1), H0, W)


def test_variants_and_reasons():
    names = fp32.variants()
    assert "generic-fp32" in names or not fp32._supported("generic-fp32")[0]
    assert names == [n for n in fp32.VARIANTS if n in names]          # best first
    kernel, why = fp32.load("no-such-variant")
    assert kernel is None and "unknown variant" in why
    best, why = fp32.load()
    assert (best is None) == bool(why)
    if best is not None:
        assert best.name == names[0] or not fp32.load(names[0])[0]


def test_unsupported_variant_is_refused(monkeypatch):
    """A CPU without AVX-512 (as /proc/cpuinfo says) is not offered the avx512 build."""
    monkeypatch.setattr(fp32, "_cpu_flags", lambda: {"sse2", "avx", "avx2", "fma"})
    monkeypatch.setattr(fp32.build, "is_x86", lambda: True)
    ok, why = fp32._supported("avx512-fp32")
    assert not ok and "avx512f" in why
    assert "avx512-fp32" not in fp32.variants()


@pytest.mark.parametrize("h", [256, 250])   # 250: a last panel narrower than the tile, on every ISA
def test_exact_under_competition(variant, h):
    """Busy processes take the cores while 2 and 3 threads run: a thread that loses its core mid
    step is waited for or helped (its panel run twice), and the results stay bit for bit those
    of one thread (each element is the same dot product, in the same order, on any thread)."""
    k = _kernel_or_skip(variant)
    g = torch.Generator().manual_seed(5)
    steps, batch = 12, 32
    W = torch.randn(h, h, generator=g) / h ** 0.5
    H0 = torch.randn(batch, h, generator=g)
    A = torch.randn(steps, batch, h, generator=g)
    dH = torch.randn(steps, batch, h, generator=g)
    H1 = k.forward(A, H0, W, 1, out=torch.empty_like(A))
    dA1, dH01 = k.backward(dH, H1, W, 1)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for rep in range(30):
            T = 2 + rep % 2
            assert torch.equal(k.forward(A, H0, W, T, out=torch.empty_like(A)), H1)
            assert torch.equal(k.forward(A.clone(), H0, W, T), H1)                 # in place
            dA, dH0 = k.backward(dH, H1, W.t().contiguous().t(), T)                # W^T's layout
            assert torch.equal(dA, dA1) and torch.equal(dH0, dH01)
    finally:
        for p in hogs:
            p.kill()
            p.wait()


# K, h, n: K past one block of Q's rows (KC_TN) and not a multiple of it, an edge panel
# narrower than the tile (n = 28, 250), h not a multiple of the tile's rows, K = 0
@pytest.mark.parametrize("K,h,n", [(1120, 256, 256), (1121, 250, 28), (7, 5, 3), (0, 4, 9), (300, 33, 70)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gemm_tn(variant, K, h, n, threads):
    """P^T Q, the weight gradient's matmul, against float64, with P and Q read through row
    strides (views into wider matrices)."""
    k = _kernel_or_skip(variant)
    g = torch.Generator().manual_seed(6)
    P = torch.randn(K, h + 3, generator=g)[:, 1:h + 1]
    Q = torch.randn(K, n + 5, generator=g)[:, :n]
    C = k.gemm_tn(P, Q, threads)
    _close(C, (P.double().t() @ Q.double()).float(), f"gemm_tn {K}x{h}x{n}")
    assert torch.equal(k.gemm_tn(P, Q, 1), C)            # the same sums on any number of threads


def test_gemm_tn_exact_under_competition(variant):
    """A unit run twice (its thread lost its core, another helped) still writes C once."""
    k = _kernel_or_skip(variant)
    g = torch.Generator().manual_seed(7)
    P, Q = torch.randn(1120, 250, generator=g), torch.randn(1120, 250, generator=g)
    one = k.gemm_tn(P, Q, 1)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for rep in range(20):
            assert torch.equal(k.gemm_tn(P, Q, 2 + rep % 2), one)
    finally:
        for p in hogs:
            p.kill()
            p.wait()


def test_gemm_tn_bad_arguments(variant):
    k = _kernel_or_skip(variant)
    with pytest.raises(ValueError):
        k.gemm_tn(torch.zeros(3, 4), torch.zeros(2, 4))          # rows differ
    with pytest.raises(ValueError):
        k.gemm_tn(torch.zeros(3, 4).t(), torch.zeros(4, 3))      # P's rows not contiguous
    with pytest.raises(ValueError):
        k.gemm_tn(torch.zeros(3, 4).double(), torch.zeros(3, 4))


# h, K, n: the output layer's shapes (a panel narrower than the tile), rows past one unit and
# not a multiple of the tile's, K = 0
@pytest.mark.parametrize("h,K,n", [(1120, 256, 28), (1121, 250, 28), (300, 28, 250), (5, 7, 1), (9, 0, 4)])
@pytest.mark.parametrize("transposed", [False, True], ids=["M", "M^T view"])
@pytest.mark.parametrize("threads", [1, 3])
def test_matmul(variant, h, K, n, transposed, threads):
    k = _kernel_or_skip(variant)
    g = torch.Generator().manual_seed(8)
    P = torch.randn(h, K + 2, generator=g)[:, 2:]
    M = torch.randn(n, K, generator=g).t() if transposed else torch.randn(K, n, generator=g)
    bias = torch.randn(n, generator=g)
    want = P.double() @ M.double()
    _close(k.matmul(P, M, None, threads), want.float(), "matmul")
    C = k.matmul(P, M, bias, threads)
    _close(C, (want + bias.double()).float(), "matmul + bias")
    assert torch.equal(k.matmul(P, M, bias, 1), C)
    with pytest.raises(ValueError):
        k.matmul(P, M[:-1] if K else torch.zeros(1, n))               # K differs
    with pytest.raises(ValueError):
        k.matmul(P, M, torch.zeros(n + 1))


@pytest.mark.parametrize("transposed", [False, True], ids=["W", "nn.Linear's weight.t()"])
def test_linear_fp32_matches_torch(variant, transposed):
    """The output layer on the team: the values and the three gradients of F.linear."""
    k = _kernel_or_skip(variant)
    g = torch.Generator().manual_seed(9)
    H = torch.randn(35, 32, 200, generator=g).requires_grad_()
    W = (torch.randn(28, 200, generator=g).t() if transposed else torch.randn(200, 28, generator=g)).requires_grad_()
    b = torch.randn(28, generator=g).requires_grad_()
    dY = torch.randn(35 * 32, 28, generator=g)
    Y = fp32.linear_fp32(H, W, b, variant, 2)
    got = (Y, *torch.autograd.grad(Y, (H, W, b), dY))
    Yr = torch.nn.functional.linear(H.reshape(-1, 200), W.t(), b)
    want = (Yr, *torch.autograd.grad(Yr, (H, W, b), dY))
    for name, a, w in zip(("Y", "dH", "dW", "db"), got, want):
        _close(a, w, name)
    assert got[2].stride() == W.stride() or not transposed   # nn.Linear's weight: no copy needed


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_team_after_fork(variant):
    """A forked child has none of the parent's team threads: it starts its own."""
    k = _kernel_or_skip(variant)
    g = torch.Generator().manual_seed(6)
    W, H0, A = torch.randn(64, 64, generator=g) / 8, torch.randn(5, 64, generator=g), torch.randn(4, 5, 64, generator=g)
    want = k.forward(A, H0, W, 2, out=torch.empty_like(A))          # the parent's team exists
    pid = os.fork()
    if pid == 0:                                                      # child: exit code says
        ok = torch.equal(k.forward(A, H0, W, 2, out=torch.empty_like(A)), want)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_strided_weight_view(variant):
    """W read through any strides: a column slice of a wider matrix, as a view."""
    steps, batch, h, V = 4, 6, 33, 9
    X, W_in, b, H0, _, _, dHs = _params(steps, batch, h, V, True, False, seed=8)
    big = (torch.randn(h, 2 * h + 3, generator=torch.Generator().manual_seed(9)) / h ** 0.5).requires_grad_()
    got_H, got = _run(lambda *a: fp32.TanhRNNFp32.apply(*a, variant, 2), X, W_in, b, H0, big, big[:, 3:h + 3], dHs)
    want_H, want = _run(lambda *a: TanhRNNLayer.apply(*a, False), X, W_in, b, H0, big, big[:, 3:h + 3], dHs)
    _close(got_H, want_H, "Hs")
    for name in want:
        _close(got[name], want[name], f"grad of {name}")


@pytest.mark.parametrize("env", [{"CC": "/nonexistent/cc"}, {"CHARRNN_NATIVE": "0"}])
def test_unavailable_says_why(env, tmp_path):
    """No compiler, or native code turned off: importing works, load() gives None and a reason."""
    code = ("from charrnn.kernels import fp32; k, why = fp32.load(); "
            "assert k is None and why, (k, why); print(why)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "CHARRNN_BUILD": str(tmp_path), **env},
                            cwd=str(fp32.build.BUILD_DIR.parent))
    assert result.returncode == 0, result.stderr
    assert ("no C compiler" in result.stdout) == ("CC" in env)


def test_generation_loop_checks_its_inputs(variant):
    k = fp32.loops(variant)
    h, V = 20, 5
    E, W, O, bo = torch.randn(V, h), torch.randn(h, h), torch.randn(h, V), torch.randn(V)
    with pytest.raises(ValueError):
        fp32.GenerationLoop(k, E, W.double(), O, bo)
    with pytest.raises(ValueError):
        fp32.GenerationLoop(k, E, W, O.t(), bo)
    loop = fp32.GenerationLoop(k, E, W, O, bo)
    with pytest.raises(ValueError):
        loop.run(torch.zeros(h + 1), None, 0, 3)                       # wrong state size
    with pytest.raises(ValueError):
        loop.run(torch.zeros(h), None, V, 3)                           # token outside the vocabulary
    with pytest.raises(ValueError):
        loop.run(torch.zeros(h), None, -1, 3)                          # no logits to pick the first from
    with pytest.raises(ValueError):
        loop.run(torch.zeros(h), None, 0, 3, temperature=1.0)          # sampling without uniforms
    hs = torch.zeros(h)
    tokens, n = loop.run(hs, None, 1, 4, temperature=1.0, u=torch.rand(4, dtype=torch.float64))
    assert n == 4 and tokens[0] == 1 and all(0 <= t < V for t in tokens)
    assert loop.run(hs, None, 0, 0) == ([], 0)
    loop.close()
    loop.close()                                                       # twice is fine


def test_generation_loop_greedy_is_the_argmax_of_its_steps(variant):
    """Greedy from a first token: each next token is the argmax of (step's h) @ O + bo, the steps
    those of Loops.forward."""
    k = fp32.loops(variant)
    g = torch.Generator().manual_seed(3)
    h, V, n = 70, 9, 40
    E, O, bo = torch.randn(V, h, generator=g), torch.randn(h, V, generator=g), torch.randn(V, generator=g)
    W = torch.randn(h, h, generator=g) * (0.9 / h ** 0.5)
    loop = fp32.GenerationLoop(k, E, W, O, bo)
    hs = torch.zeros(h)
    tokens, got = loop.run(hs.clone(), None, 4, n)
    H = torch.zeros(1, h)
    for t in range(got - 1):
        H = k.forward(E[tokens[t]].view(1, 1, h).clone(), H, W, threads=1, out=torch.empty(1, 1, h))[0]
        assert tokens[t + 1] == int((H @ O + bo).argmax())
    assert got >= n // 2
