"""The run log's loss plot: redrawn at most every PLOT_INTERVAL_S while training (a draw costs the
loop ~0.2 s), right away at an evaluation, and at the end with every point."""

import lorakit.training.runlog as runlog


def test_the_plot_is_drawn_at_most_every_interval_and_complete_at_the_end(tmp_path, monkeypatch):
    draws, clock = [], [1000.0]
    monkeypatch.setattr(runlog, "plot_losses", lambda path, train, evals: draws.append((len(train), len(evals))))
    monkeypatch.setattr(runlog.time, "monotonic", lambda: clock[0])
    log = runlog.RunLog(tmp_path, 100, 0, False, True, False)
    for step in range(1, 21):  # a write every step, one second apart
        log.step(step, 1.0 / step, 1e-3, 0.5, 100, 50.0, write=True)
        clock[0] += 1.0
    assert draws == [(1, 0)]  # the first point at once, then nothing for PLOT_INTERVAL_S
    clock[0] += runlog.PLOT_INTERVAL_S
    log.step(21, 0.04, 1e-3, 0.5, 100, 50.0, write=True)
    assert draws[-1] == (21, 0)
    log.step(22, 0.04, 1e-3, 0.5, 100, 50.0, write=True)
    log.eval(22, {"eval_loss": 0.5})  # an evaluation is drawn at once, with the points since
    assert draws[-1] == (22, 1) and len(draws) == 3
    log.step(23, 0.03, 1e-3, 0.5, 100, 50.0, write=True)
    log.close()
    log.close()  # closed twice (finish closes again): drawn once
    assert draws[-1] == (23, 1) and len(draws) == 4
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 24  # every point is still written


def test_no_plot_no_draw(tmp_path, monkeypatch):
    draws = []
    monkeypatch.setattr(runlog, "plot_losses", lambda *a: draws.append(a))
    log = runlog.RunLog(tmp_path, 10, 0, False, False, False)
    log.step(1, 1.0, 1e-3, 0.5, 10, 5.0, write=True)
    log.eval(1, {"eval_loss": 1.0})
    log.close()
    assert draws == []
