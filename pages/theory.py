"""Theory: a planted low-rank matrix fitted by a product of N factors with weight decay."""

import streamlit as st

from app import charts, plot, state, theory, ui

LAMBDA_STEP = 0.01  # the λ slider's step

#: widget key -> (URL parameter, type, lowest, highest): the settings a refresh keeps
_IN_URL = {
    state.THEORY_N: ("n", int, 1, 5),
    state.THEORY_LAMBDA: ("lambda", float, 0.0, 1.0),
    state.THEORY_RANK: ("rank", int, 1, 10),
    state.THEORY_SEED: ("seed", int, 0, 10_000),
}


def _from_url(param: str, kind: type, low: float, high: float, default):
    """The URL's value of ``param`` when it is a number of ``kind`` in [low, high], else
    ``default`` (a hand-edited or stale link falls back quietly). λ is put on its slider's
    steps, so the slider shows the λ the fit uses (``lambda=0.123`` is 0.12, ``-0`` is 0)."""
    text = state.from_url(param)
    try:
        value = kind(float(text)) if kind is float else kind(text)
    except (TypeError, ValueError):
        return default
    if not low <= value <= high:  # (NaN too)
        return default
    return round(round(value / LAMBDA_STEP) * LAMBDA_STEP, 2) + 0.0 if kind is float else value


@ui.guarded
def main() -> None:
    ui.page_title("Theory: why factors prefer low rank", uses_runs=False)
    st.markdown(
        "A planted matrix **M** of low rank, observed with a little noise as **Y**, is fitted "
        "by a product of **N** square factors `W = W_N ⋯ W_1`, minimising "
        "`½‖W − Y‖² + ½λ Σᵢ‖Wᵢ‖²` — ordinary weight decay on every factor. It trains in "
        "a fraction of a second."
    )
    c1, c2 = st.columns(2)
    for key, (param, kind, low, high) in _IN_URL.items():  # a refresh comes back to them
        state.setdefault(key, _from_url(param, kind, low, high, theory.DEFAULTS[key.split(".")[1]]))
    n = c1.slider("N (number of factors)", 1, 5, key=state.THEORY_N)
    lam = c2.slider("λ (weight decay)", 0.0, 1.0, step=LAMBDA_STEP, key=state.THEORY_LAMBDA)
    with st.expander("Planted matrix"):
        e1, e2 = st.columns(2)
        rank = e1.slider("true rank", 1, 10, key=state.THEORY_RANK)
        seed = e2.number_input("seed", 0, 10_000, key=state.THEORY_SEED)
    for key, (param, *_) in _IN_URL.items():
        state.to_url(param, f"{st.session_state[key]:g}")
    with st.spinner("Fitting…"):
        res = theory.fit(int(n), float(lam), int(rank), int(seed))

    plot.show(
        charts.theory_spectrum(res["learned"], res["true"], n_factors=n, observed=res["observed"]),
        key="theory.chart",
    )
    st.caption("Log scale: values below 10⁻⁶ of the largest are drawn on the bottom line.")
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Σ‖Wᵢ‖² (learned factors)", f"{res['penalty']:.4f}")
    m2.metric(f"N·Σσ^(2/N) (N={n})", f"{res['balanced']:.4f}")
    m3.metric("effective rank of W", res["effective_rank"], help=f"true rank {rank}")
    m4.metric("‖W − M‖ / ‖M‖", f"{res['residual']:.3f}", help="distance to the planted M")
    st.latex(
        rf"\sum_{{i=1}}^{{{n}}}\|W_i\|_F^2 = {res['penalty']:.4f}"
        rf"\quad\ge\quad {n}\cdot\sum_j \sigma_j(W)^{{2/{n}}} = {res['balanced']:.4f}"
    )
    st.caption(theory.identity_note(res, float(lam)))
    zero = theory.zero_note(res, int(n), float(lam))
    if zero:
        st.warning(zero, icon="⚠️")
    st.markdown(
        """
**Why N = 1 has no rank preference.** With one factor the penalty is `λ‖W‖_F² = λ Σσ²`.
The fit then shrinks every singular value by the same factor `1/(1+λ)`: the noise directions
shrink exactly as much as the signal, and nothing is cut to zero. Move the slider to N = 1:
the learned curve is the observed one, scaled down.

**Why N ≥ 2 does.** Weight decay on N factors costs, at best, `N Σσ^(2/N)`. For N = 2 that is
twice the nuclear norm, and the fit soft-thresholds the spectrum: every singular value of the
data drops by λ, and those below λ become exactly zero. For N ≥ 3 the exponent 2/N < 1 makes small singular values relatively expensive
(a Schatten quasi-norm), so they are pushed to zero harder while the large ones barely move.
The learned spectrum drops off a cliff after the true rank: that is the low rank a network
trained this way hands to the truncation step.
"""
    )


main()
