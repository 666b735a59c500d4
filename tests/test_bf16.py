"""bf16 training: the MKL matmul wrapper, the bf16 recurrence against fp32, and choosing a precision."""
import pytest
import torch

from charrnn import kernels
from charrnn.kernels import bf16gemm
from charrnn.kernels.fused import tanh_rnn_layer
from charrnn.models import ModelConfig, build_model
from charrnn.train import TrainConfig, Trainer

needs_bf16 = pytest.mark.skipif(not bf16gemm.available(),
                                reason="needs PyTorch's MKL and a CPU with AMX or AVX512-BF16")
BF = torch.bfloat16
CPU = torch.device("cpu")


def use(model, precision: str):
    """Train `model` in `precision` from now on: the fastest kernel here in it."""
    model.kernel = kernels.select(model.config, "cpu", precision)
    return model.train()


def bf16_exact(*shape, seed=0):
    """Random bf16 values, and the same values in fp32 (so fp32 matmuls are the exact reference)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(BF)
    return x, x.float()


@needs_bf16
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("views", [False, True])
def test_gemm_matches_fp32_matmul(trans_a, trans_b, views):
    m, n, k = 5, 7, 9
    a, af = bf16_exact(*((k, m) if trans_a else (m, k)), seed=1)
    b, bf = bf16_exact(*((n, k) if trans_b else (k, n)), seed=2)
    if views:  # column-major operands: transposed views of row-major storage
        a, af, b, bf = a.t().contiguous().t(), af, b.t().contiguous().t(), bf
    C0 = torch.randn(m, n)
    expected = (af.t() if trans_a else af) @ (bf.t() if trans_b else bf)
    C = bf16gemm.gemm(C0.clone(), a, b, trans_a=trans_a, trans_b=trans_b, beta=0.0)
    torch.testing.assert_close(C, expected, rtol=1e-5, atol=1e-5)
    C = bf16gemm.gemm(C0.clone(), a, b, trans_a=trans_a, trans_b=trans_b)  # beta = 1 accumulates
    torch.testing.assert_close(C, C0 + expected, rtol=1e-5, atol=1e-5)


@needs_bf16
def test_gemm_refuses_bad_operands_before_calling_mkl():
    a, _ = bf16_exact(4, 3)
    b, _ = bf16_exact(3, 5)
    with pytest.raises(TypeError, match="bfloat16"):
        bf16gemm.gemm(torch.zeros(4, 5), a.float(), b)
    with pytest.raises(TypeError, match="float32"):
        bf16gemm.gemm(torch.zeros(4, 5, dtype=BF), a, b)
    with pytest.raises(ValueError, match="do not give"):
        bf16gemm.gemm(torch.zeros(4, 6), a, b)
    with pytest.raises(ValueError, match="row- or column-major"):
        bf16gemm.gemm(torch.zeros(4, 5), a, bf16_exact(3, 10)[0][:, ::2])
    # one row of a transposed matrix: its elements are not next to each other, MKL would write them so
    with pytest.raises(ValueError, match="C must be row-major"):
        bf16gemm.gemm(torch.zeros(4, 6).t()[:1], bf16_exact(1, 3)[0], bf16_exact(3, 4)[0])


@needs_bf16
def test_gemm_single_rows_and_columns():
    """Shapes with one row or column have ambiguous strides; each still gets a valid layout."""
    a, af = bf16_exact(1, 3)
    b, bf = bf16_exact(3, 4)
    C = torch.zeros(4, 1).t()                         # (1, 4), strides (1, 1): still contiguous
    torch.testing.assert_close(bf16gemm.gemm(C, a, b, beta=0.0), af @ bf)
    col, colf = bf16_exact(3, 1)
    out = torch.zeros(1, 1)
    torch.testing.assert_close(bf16gemm.gemm(out, a, col.t().contiguous().t(), beta=0.0), af @ colf)


@needs_bf16
def test_step_gemm_adds_each_step_and_checks_its_indices():
    Cs = torch.randn(3, 4, 6)
    As, Af = bf16_exact(4, 4, 5)
    B, Bf = bf16_exact(6, 5)  # used transposed
    step = bf16gemm.step_gemm(Cs, As, B, trans_b=True)
    expected = Cs.clone()
    expected[2] += Af[3] @ Bf.t()
    step(2, 3)
    torch.testing.assert_close(Cs, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError):
        step(3, 0)
    with pytest.raises(ValueError, match="contiguous"):
        bf16gemm.step_gemm(Cs.transpose(0, 1), As, B, trans_b=True)


@needs_bf16
@pytest.mark.parametrize("ids", [True, False])
@pytest.mark.parametrize("transposed_W", [False, True])
def test_bf16_layer_follows_fp32(ids, transposed_W):
    """Same outputs and gradients as the fp32 layer, to bf16's precision (8 bits of mantissa)."""
    g = torch.Generator().manual_seed(0)
    steps, batch, h, n_in = 35, 8, 64, 28
    X = torch.randint(0, n_in, (steps, batch), generator=g) if ids else torch.randn(steps, batch, n_in, generator=g)
    W_in = (torch.randn(n_in, h, generator=g) * 0.3).requires_grad_()
    b = (torch.randn(h, generator=g) * 0.1).requires_grad_()
    H0 = (torch.randn(batch, h, generator=g) * 0.5).requires_grad_()
    W_full = (torch.randn(h, h, generator=g) * 0.1).requires_grad_()  # contracting, as trained RNNs are
    W = W_full.t() if transposed_W else W_full                         # RNNModel passes W_hh.t()
    weights = torch.randn(steps, batch, h, generator=g)
    results = []
    for bf16 in (False, True):
        Hs = tanh_rnn_layer(X, W_in, b, H0, W, bf16)
        grads = torch.autograd.grad((Hs * weights).sum(), [W_in, b, H0, W_full])
        results.append((Hs.detach(), *grads))
    for name, fp32, bf16 in zip(["H", "dW_in", "db", "dH0", "dW"], *results):
        rel = ((fp32 - bf16).norm() / fp32.norm()).item()
        assert rel < 2e-2, f"{name}: relative difference {rel:.1e}"
        assert rel > 0 or name == "dW_in", f"{name}: bf16 gave exactly fp32's numbers; did it run?"


@needs_bf16
def test_evaluation_runs_in_fp32_whatever_the_training_precision():
    model = use(build_model(ModelConfig("scratch", 28, 32), seed=0), "bf16")
    X = torch.randint(0, 28, (4, 10))
    model.eval()
    with torch.no_grad():
        evaluated, _ = model(X, model.begin_state(4))
        model.kernel = model.kernel.inference
        assert model.kernel.precision == "fp32"
        fp32, _ = model(X, model.begin_state(4))
    assert torch.equal(fp32, evaluated)


def test_precision_and_kernel_choice():
    scratch, rnn, gru = (ModelConfig(kind, 28, 16) for kind in ("scratch", "rnn", "gru"))
    runnable = [name for name, why in kernels.choices(scratch, CPU).items() if why is None]
    assert kernels.select(scratch, CPU).name == runnable[0] == kernels.select(rnn, CPU).name
    assert kernels.select(scratch, CPU, "fp32").precision == "fp32"
    assert kernels.select(gru, CPU).name == "reference"
    assert kernels.select(scratch, CPU, name="reference").name == "reference"
    assert kernels.select(scratch, torch.device("cuda")).name == "cudnn"
    with pytest.raises(ValueError, match="tanh RNNs"):
        kernels.select(gru, CPU, "bf16")
    with pytest.raises(ValueError, match="CPU only"):
        kernels.select(scratch, torch.device("cuda"), "bf16")
    with pytest.raises(ValueError, match="Precision must be"):
        TrainConfig(precision="fp16")


@needs_bf16
def test_bf16_training_reaches_fp32_quality(corpus):
    """A short run: the bf16 run's perplexity is within 5% of the fp32 run's."""
    ppl = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(TrainConfig(hidden_size=128, epochs=40, sample_every=1000, precision=precision,
                                      device="cpu"), corpus)
        assert trainer.precision == precision
        *_, last = trainer.run()
        ppl[precision] = last.train_ppl
    assert ppl["fp32"] < 12, ppl  # it learned something (uniform: 28)
    assert abs(ppl["bf16"] / ppl["fp32"] - 1) < 0.05, ppl


@needs_bf16
def test_step_gemm_keeps_its_buffers_alive():
    """The caller may drop its own references: step still writes into live memory."""
    import gc
    As, Af = bf16_exact(1, 4, 5)
    B, Bf = bf16_exact(5, 3)
    step = bf16gemm.step_gemm(torch.zeros(1, 4, 3), As, B)
    gc.collect()
    for _ in range(3):
        step(0, 0)
    torch.testing.assert_close(step.buffers[0][0], 3 * (Af[0] @ Bf), rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# the step loops in C (charrnn/kernels/bf16.py)

def test_the_c_loops_build_here():
    """Where bf16 runs and a C compiler is there, the loops build; elsewhere they are None."""
    import shutil
    from charrnn.kernels import bf16 as native
    expected = bf16gemm.available() and shutil.which("cc") is not None
    assert (native.loops() is not None) == expected


@needs_bf16
@pytest.mark.parametrize("ids", [True, False])
@pytest.mark.parametrize("transposed_W", [False, True])
@pytest.mark.parametrize("batch, h", [(4, 48), (32, 64)])  # MKL's matmul; AMX tiles where the CPU has them
def test_c_loops_match_the_python_loops(monkeypatch, ids, transposed_W, batch, h):
    from charrnn.kernels import bf16 as native
    if native.loops() is None:
        pytest.skip("no C compiler on this machine: the Python loops are the only ones")
    g = torch.Generator().manual_seed(3)
    steps, n_in = 12, 28
    X = torch.randint(0, n_in, (steps, batch), generator=g) if ids else torch.randn(steps, batch, n_in, generator=g)
    W_in = (torch.randn(n_in, h, generator=g) * 0.3).requires_grad_()
    b = (torch.randn(h, generator=g) * 0.1).requires_grad_()
    H0 = (torch.randn(batch, h, generator=g) * 0.5).requires_grad_()
    W_full = (torch.randn(h, h, generator=g) * 0.1).requires_grad_()
    W = W_full.t() if transposed_W else W_full
    weights = torch.randn(steps, batch, h, generator=g)
    results = []
    for use_c in (True, False):
        if not use_c:
            monkeypatch.setattr(native, "loops", lambda: None)
        Hs = tanh_rnn_layer(X, W_in, b, H0, W, True)
        results.append((Hs.detach(), *torch.autograd.grad((Hs * weights).sum(), [W_in, b, H0, W_full])))
    for name, c, py in zip(["H", "dW_in", "db", "dH0", "dW"], *results):
        # not bit for bit: glibc's tanh against PyTorch's, AMX's sums against MKL's; and a last-bit
        # difference can round a value to the other bf16 neighbour, so compare whole tensors
        rel = ((c - py).norm() / py.norm()).item()
        assert rel < 2e-4, f"{name}: relative difference {rel:.1e}"


def test_loading_the_c_loops_keeps_subnormal_numbers():
    """The library is built with -ffast-math but not linked with it: no flush-to-zero for the
    thread that loads it (GCC's crtfastmath.o would switch it on)."""
    from charrnn.kernels import bf16 as native
    native.loops()
    assert torch.tensor([1e-38]).mul(0.01).item() > 0


@needs_bf16
def test_c_loops_check_their_arguments():
    from charrnn.kernels import bf16 as native
    loops = native.loops()
    if loops is None:
        pytest.skip("no C compiler on this machine: the Python loops are the only ones")
    A, Hb, W = torch.zeros(3, 2, 4), torch.zeros(4, 2, 4, dtype=BF), torch.zeros(4, 4, dtype=BF)
    with pytest.raises(ValueError, match="Hb must be"):
        loops.forward(A, Hb[:3], W)
    with pytest.raises(ValueError, match="A must be"):
        loops.forward(A.double(), Hb, W)
    with pytest.raises(ValueError, match="W must be"):
        loops.forward(A, Hb, torch.zeros(4, 5, dtype=BF))
    with pytest.raises(ValueError, match="dAb must be"):
        loops.backward(A, A.clone(), A.clone(), Hb[:3].float(), W)
    ids, table = torch.zeros(3, 2, dtype=torch.long), torch.zeros(5, 4)   # the lookup: (steps, batch), (vocab, h)
    with pytest.raises(ValueError, match="ids must be"):
        loops.forward(A, Hb, W, ids.t().contiguous(), table)
    with pytest.raises(ValueError, match="ids must be"):
        loops.forward(A, Hb, W, ids.int(), table)
    with pytest.raises(ValueError, match="table must be"):
        loops.forward(A, Hb, W, ids, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="table must be .*not None"):          # ids without a table
        loops.forward(A, Hb, W, ids)
    with pytest.raises(ValueError, match="ids must be .*not None"):            # G without ids
        loops.backward(A, A.clone(), A.clone(), Hb[:3].clone(), W, None, torch.zeros(6, 4))
    for bad in (5, -1):
        ids[2, 1] = bad
        with pytest.raises(IndexError, match="outside 0 .. 4"):
            loops.forward(A, Hb, W, ids, table)
    ids[2, 1] = 4
    table[4] = 0.5                                                       # W = 0: H = tanh(table rows)
    loops.forward(A, Hb, W, ids, table)
    torch.testing.assert_close(A[2, 1], torch.full((4,), 0.5).tanh())
    assert torch.equal(A[0], torch.zeros(2, 4))
    # the backward's sums per id: G (vocab + 1, h), the last row b's gradient
    dH, H = torch.randn(3, 2, 4), torch.zeros(3, 2, 4)                  # H = 0: dA = dH
    G = torch.zeros(6, 4)
    with pytest.raises(ValueError, match="G must be"):
        loops.backward(dH, A.clone(), H, Hb[:3].clone(), W, ids, torch.zeros(6, 4).double())
    loops.backward(dH, A.clone(), H, Hb[:3].clone(), W, ids, G)
    expected = torch.zeros(6, 4).index_add_(0, ids.reshape(-1), dH.reshape(-1, 4))
    expected[5] = dH.reshape(-1, 4).sum(0)
    torch.testing.assert_close(G, expected)
    ids[0, 0] = 5
    with pytest.raises(IndexError, match="outside 0 .. 4"):
        loops.backward(dH, A.clone(), H, Hb[:3].clone(), W, ids, G.zero_())


# -----------------------------------------------------------------------------
# the output layer on AMX tiles (kernels.fused.linear_head, LinearBF16)

def _amx_head() -> bool:
    from charrnn.kernels import bf16 as native
    loops = native.loops() if bf16gemm.available() else None
    return loops is not None and loops.head_fits(32, 32, 2)


needs_amx_head = pytest.mark.skipif(not _amx_head(), reason="needs the C library and a CPU with AMX tiles")


def head_operands(tokens, h, V, column_major, seed=0):
    """bf16-exact H (tokens, h), W (h, V) (row-major, or a transposed view as nn.Linear's), b."""
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(tokens, h, generator=g).to(BF).float().requires_grad_()
    W = torch.randn(*((V, h) if column_major else (h, V)), generator=g).to(BF).float()
    W = (W.t() if column_major else W).detach().requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_()
    dY = torch.randn(tokens, V, generator=g).to(BF).float()         # bf16-exact, like the inputs
    return H, W, b, dY


@needs_amx_head
@pytest.mark.parametrize("V", [28, 32, 33])                      # padded to 32, exact, padded to 64
@pytest.mark.parametrize("column_major", [False, True])
def test_bf16_head_matches_fp32_on_bf16_exact_inputs(V, column_major):
    """On bf16-exact inputs the tile matmuls differ from fp32's only in the order of their sums."""
    from charrnn.kernels.fused import linear_head
    H, W, b, dY = head_operands(96, 64, V, column_major)
    results = []
    for bf16 in (True, False):
        Y = linear_head(H, W, b, bf16)
        assert Y.grad_fn.name() == ("LinearBF16Backward" if bf16 else "AddmmBackward0")
        results.append((Y.detach(), *torch.autograd.grad(Y, [H, W, b], dY)))
    assert results[0][2].stride() == W.stride()                   # dW has W's layout
    for name, tiles, fp32 in zip(["Y", "dH", "dW", "db"], *results):
        torch.testing.assert_close(tiles, fp32, rtol=1e-5, atol=1e-4, msg=name)


@needs_amx_head
def test_bf16_head_rounds_fp32_inputs_like_bf16():
    """Inputs that are not bf16-exact are rounded first: the result is the fp32 one of the rounded
    inputs, and within bf16's precision of the unrounded one."""
    from charrnn.kernels.fused import linear_head
    g = torch.Generator().manual_seed(1)
    H, W, b = torch.randn(64, 32, generator=g), torch.randn(32, 28, generator=g), torch.randn(28, generator=g)
    Y = linear_head(H, W, b, True)
    torch.testing.assert_close(Y, H.to(BF).float() @ W.to(BF).float() + b, rtol=1e-5, atol=1e-4)
    exact = H @ W + b
    assert 0 < ((Y - exact).norm() / exact.norm()).item() < 1e-2


@needs_amx_head
def test_bf16_head_takes_the_recurrences_copy(monkeypatch):
    """Training in bf16, the scratch model's head reads the forward loop's bf16 copy of H (no
    second conversion), and follows the fp32 model."""
    from charrnn.kernels import fused
    seen = []
    real = fused.LinearBF16.apply
    monkeypatch.setattr(fused.LinearBF16, "apply", lambda H, W, b, Hb: seen.append(Hb) or real(H, W, b, Hb))
    X = torch.randint(0, 28, (32, 10), generator=torch.Generator().manual_seed(0))
    results = []
    for precision in ("fp32", "bf16"):
        model = use(build_model(ModelConfig("scratch", 28, 64), seed=0), precision)
        Y, _ = model(X, model.begin_state(32))
        Y.square().sum().backward()
        results.append((Y.detach(), *[p.grad for p in model.parameters()]))
    assert len(seen) == 1 and seen[0] is not None and seen[0].dtype == BF
    for fp32, bf16 in zip(*results):
        assert ((fp32 - bf16).norm() / fp32.norm()).item() < 2e-2


@needs_amx_head
def test_bf16_copy_is_dropped_when_H_changes():
    from charrnn.kernels.fused import bf16_copy
    model = use(build_model(ModelConfig("scratch", 28, 32), seed=0), "bf16")
    Hs, _ = model.features(torch.randint(0, 28, (32, 4)), model.begin_state(32))
    assert torch.equal(bf16_copy(Hs), Hs.detach().to(BF))
    with torch.no_grad():
        Hs.mul_(2)
    assert bf16_copy(Hs) is None


@needs_amx_head
def test_concise_rnn_head_in_bf16_follows_fp32():
    """nn.Linear's (vocab, h) weight goes in as a transposed view, and its gradient comes back in
    the weight's own layout."""
    X = torch.randint(0, 33, (32, 6), generator=torch.Generator().manual_seed(2))
    results = []
    for precision in ("fp32", "bf16"):
        model = use(build_model(ModelConfig("rnn", 33, 64), seed=0), precision)
        Y, _ = model(X, model.begin_state(32))
        assert (Y.grad_fn.name() == "LinearBF16Backward") == (precision == "bf16")  # the tiles, not a fallback
        Y.square().sum().backward()
        assert model.linear.weight.grad.is_contiguous()
        results.append((Y.detach(), model.linear.weight.grad, model.linear.bias.grad, model.rnn.weight_hh_l0.grad))
    for fp32, bf16 in zip(*results):
        rel = ((fp32 - bf16).norm() / fp32.norm()).item()
        assert 0 < rel < 2e-2


def test_bf16_head_falls_back_to_fp32(monkeypatch):
    """Tokens that do not fill whole tiles, or no C library: the fp32 output layer, exactly."""
    from charrnn.kernels import bf16 as native
    from charrnn.kernels.fused import linear_head
    for tokens, h in [(40, 64), (64, 48)]:                     # 40 tokens; h = 48: not multiples of 32
        H, W, b, _ = head_operands(tokens, h, 28, False)
        assert linear_head(H, W, b, True).grad_fn.name() == "AddmmBackward0"
    H, W, b, _ = head_operands(64, 64, 28, False)
    monkeypatch.setattr(native, "loops", lambda: None)
    Y = linear_head(H, W, b, True)
    assert Y.grad_fn.name() == "AddmmBackward0"
    assert torch.equal(Y, H @ W + b)


@needs_amx_head
def test_native_head_checks_its_arguments():
    from charrnn.kernels import bf16 as native
    loops = native.loops()
    H, W, b = torch.zeros(64, 32), torch.zeros(32, 28), torch.zeros(28)
    with pytest.raises(ValueError, match="H must be"):
        loops.head_forward(H.double(), W, b)
    with pytest.raises(ValueError, match="H must be"):
        loops.head_forward(torch.zeros(32, 64).t(), W, b)         # not contiguous
    with pytest.raises(ValueError, match="W must be"):
        loops.head_forward(H, torch.zeros(64, 28), b)
    with pytest.raises(ValueError, match="b must be"):
        loops.head_forward(H, W, torch.zeros(29))
    with pytest.raises(ValueError, match="do not fit"):
        loops.head_forward(torch.zeros(40, 32), W, b)
    with pytest.raises(TypeError, match="float32"):
        loops.head_forward(H, W.double(), b)
    with pytest.raises(ValueError, match="row- or column-major"):
        loops.head_forward(H, torch.zeros(32, 56)[:, ::2], b)
    Y, Hb = loops.head_forward(H, W, b)
    with pytest.raises(ValueError, match="dY must be"):
        loops.head_backward(torch.zeros(64, 27), Hb, W)
    with pytest.raises(ValueError, match="Hb must be"):
        loops.head_backward(torch.zeros(64, 28), Hb.float(), W)
