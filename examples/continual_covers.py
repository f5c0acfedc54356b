"""How large are the covers of a continually trained net, by eps?  (BENCHMARKS.md, issue 15.)

Trains the MLP of ``examples/continual_learning.py`` with plain SGD on its
binary class-pair protocol (seed 0, the same settings) and, after 50 and 150
tasks, prints the cover sizes per hidden layer at eps 0.05-0.8 (covering and
fibration; cosine, average linkage, rescaling merge), nothing changed.
Runs in about a minute::

    python3 examples/continual_covers.py
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import continual_learning as cl  # noqa: E402


def main(tasks=150, report_at=(50, 150), eps_grid=(0.05, 0.1, 0.2, 0.3, 0.5, 0.8)):
    import torch
    import torch.nn.functional as F

    from fibgraph.importers.torch_break import find_covers

    torch.set_num_threads(1)
    data = cl.load_images("mnist")
    torch.manual_seed(0)
    m = cl.make_model("mlp", 2)
    rng = np.random.default_rng(0)
    seq = cl.Tasks("pairs", data, 0, 100)
    for t in range(1, tasks + 1):
        Xtr, ytr, _, _ = seq.next()
        with torch.no_grad():
            b = 1 / np.sqrt(m[-1].weight.shape[1])
            m[-1].weight.uniform_(-b, b)
            m[-1].bias.uniform_(-b, b)
        opt = torch.optim.SGD(m.parameters(), lr=cl.LR, momentum=cl.MOMENTUM)
        x, y = cl._inputs("mlp", Xtr), torch.as_tensor(ytr)
        for _ in range(2):
            order = torch.as_tensor(rng.permutation(len(y)))
            for i in range(0, len(y), 16):
                idx = order[i:i + 16]
                loss = F.cross_entropy(m(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        if t in report_at:
            for sym in ("covering", "fibration"):
                for eps in eps_grid:
                    plans = find_covers(m, eps=eps, symmetry=sym)
                    print(f"after task {t}, {sym}, eps {eps}: cover sizes per hidden layer "
                          f"{[p.cover_sizes() for p in plans[:-1]]}", flush=True)


if __name__ == "__main__":
    main()
