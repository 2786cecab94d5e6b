"""Names and config of the runs the app tests seed (shared by conftest and the tests)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository

# A digits run small enough to train in a couple of seconds on one core.
TINY = {
    "dataset": "digits",
    "model": "mlp",
    "model_kwargs": {"depth": 2, "width": 32},
    "n_factors": 3,
    "init": "balanced",
    "optimizer": "adam",
    "lr": 3e-3,
    "weight_decay": 5e-4,
    "epochs": 3,
    "batch_size": 64,
    "seed": 0,
    "device": "cpu",
    "spectra_every": 5,
}
N3 = "digits-tiny-n3"
N1 = "digits-tiny-n1"

# A regression run (its score is R², not an accuracy) as small: a planted-rank teacher's
# outputs themselves as targets (lowrank with task=regression), 8x8 inputs, 10 outputs.
TINY_REGRESSION = {
    **TINY,
    "dataset": "lowrank",
    "dataset_kwargs": {"task": "regression", "n_train": 400, "n_test": 100},
    "lr": 1e-2,
    "epochs": 8,  # about a second: R² near 0.85 (N=3) and 0.75 (N=1)
}
R3 = "lowrank-reg-tiny-n3"
R1 = "lowrank-reg-tiny-n1"


class Chart:
    """A chart a page drew (app.plot.show): its key and its plotly figure as a dict."""

    def __init__(self, key: str | None, figure: dict) -> None:
        self.key, self.figure = key, figure


def shown_charts(at) -> list[Chart]:
    """Every chart on an AppTest page, in page order (app.plot's component, or the
    st.plotly_chart it falls back to)."""
    import json

    out = []
    for el in at.get("bidi_component"):
        if el.proto.component_name == "lorita_plot":
            data = json.loads(el.proto.json)
            out.append(Chart(data["key"], json.loads(data["figure"])))
    out += [Chart(el.key, json.loads(el.proto.spec)) for el in at.get("plotly_chart")]
    return out


APP = str(ROOT / "streamlit_app.py")
TIMEOUT = 300  # a busy shared machine: the Theory fit alone can take tens of seconds


def open_page(page: str | None = None, **query):
    """The app opened on ``query`` (the address's parameters), then switched to ``page``."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for k, v in query.items():
        at.query_params[k] = v
    at.run()
    if page is not None:
        at.switch_page(f"pages/{page}.py").run()
    return at


def assert_clean(at) -> None:
    """No exception and no error element on the page."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
