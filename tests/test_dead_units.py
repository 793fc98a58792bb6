"""Dead units seen from the user's side: a ReLU layer that never fires gets its own diagnosis."""

import torch
from torch import nn

from hessdiag import Monitor
from hessdiag.detectors import VanishingGradientDetector


def test_a_dead_relu_layer_is_named_with_the_dead_unit_remedy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        model[2].bias.fill_(-100.0)  # the second ReLU is inactive for every input: its units are dead
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    monitor = Monitor(model, optimizer=optimizer, check_every=0, log_every=1)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    for _ in range(6):
        optimizer.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        monitor.after_backward()
        optimizer.step()
        monitor.after_step(None, loss)
    monitor.flush()
    (event,) = [e for e in monitor.events if e.name == "vanishing"]
    assert event.kind == "onset" and event.evidence["dead_layers"] >= 1
    assert "exactly zero gradient" in event.summary and "dead" in event.summary
    assert event.remedy == VanishingGradientDetector.dead_remedy and "LeakyReLU/GELU" in event.remedy
