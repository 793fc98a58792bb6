"""The plain training step the tests observe: the order a hand-written loop calls the Monitor in."""

from __future__ import annotations


def one_step(model, optimizer, loss_fn, batch, monitor=None):
    """zero_grad, forward, backward, (`monitor.after_backward`), step, (`monitor.after_step`, whose
    outcome is returned)."""
    optimizer.zero_grad()
    loss = loss_fn(model, batch)
    loss.backward()
    if monitor is not None:
        monitor.after_backward()
    optimizer.step()
    if monitor is not None:
        return monitor.after_step(batch, loss)
    return None
