"""Compress-retune (the compression paper's Algorithm 2) on a small
Transformer, and the fit L = L0 * P^-alpha before and after retuning
(issue 5, item 4; the paper reports alpha 0.028 -> 0.049 on Multi30k).

Model: ``examples/seq_models.py``'s TfNet (Linear(8, 32) + learned positions,
2 post-norm encoder layers with 4 heads and a ReLU feed-forward 32 -> 64 ->
32, mean over steps, Linear(32, 10)) on scikit-learn digits as 8-step
sequences.  Stratified split (seed 0): 947 train / 200 validation (early
stopping) / 200 check (the loss tests of Algorithms 2 and 3) / 450 test
(reported).  Training: Adam lr 3e-3, batch 64, early stopping on the
validation loss (patience 5, at most 80 epochs, best state restored;
``fibgraph.importers.torch_base.retune``).

What is compressed: the feed-forward units only.  The fibers come from the
hypergraph path: the torch model is exported (legacy exporter), and
``fibgraph.importers.api.compress_model`` is run with an eps file that sets eps on the
two ``linear1`` weights (complete linkage; every other weight exact); the
report's fibers of each ``linear1`` are merged in torch (rows and bias
averaged, linear2 columns summed: exactly the ONNX base; checked, max abs
logit difference printed).  d_model, attention and the head are not
compressed in torch (in the ONNX base they are not merged either at these eps:
see ``study_digits_seq.py``).

Algorithm 2: per iteration, greedy per-layer eps (Algorithm 3: each FF layer
in order, 6 bisection steps on [0, 1.99], the largest eps whose check loss
stays <= (1 + tau) * the current model's), over-compress with eps * q,
retune (Adam lr 1e-3, batch 64, early stopping on validation, patience 3, at
most 30 epochs).  Deviation: where eps * q gives the same partition as eps
(nothing more merged; with q 1.05 this is common and would end the run at
once), eps * q^j with the smallest j <= 30 that merges at least one more unit
is used (``q_power`` in the history); accept while the check loss <= (1 + rho)
* the trained model's; q 1.05, tau 0.01, rho 0.05 (as in ``study_retune.py``).  Stops when
the loss test fails, when over-compression no longer shrinks the model, or
after ``--max-iters``.

Fits (least squares of log L on log P, test cross-entropy, P = torch
parameters): "one-shot" = the trained model compressed at an eps grid without
retuning; "before retune" = each iteration's over-compressed model; "after
retune" = each iteration's retuned model (accepted or not).  Writes
``benchmarks/results/study_retune_transformer.json`` and ``.md`` and
``benchmarks/figures/retune_transformer.png``.  Run from the repository root:
``python examples/study_retune_transformer.py [--quick]``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from seq_models import TfNet, digits_seq_split, export, labels_from_fibers, n_params, tf_ff_merge  # noqa: E402
from study_lib import FIG, ROOT, save_json, timer  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
EPS_HI = 1.99


def fit_alpha(P, L):
    """L = L0 * P^-alpha by least squares on logs: (alpha, L0)."""
    P, L = np.log(np.asarray(P, float)), np.log(np.asarray(L, float))
    if P.size < 2 or np.ptp(P) == 0:
        return None, None
    slope, icpt = np.polyfit(P, L, 1)
    return float(-slope), float(np.exp(icpt))


class FFCompressor:
    """Fibers of the FF units of a TfNet at per-layer eps, via the ONNX path."""

    def __init__(self, tmp, linkage="complete"):
        self.tmp = tmp
        self.linkage = linkage
        self.calls = 0

    def __call__(self, m, eps_per_layer):
        from fibgraph.importers.api import compress_model

        self.calls += 1
        path = export(m, os.path.join(self.tmp, "cur.onnx"))
        names = [f"layers.{l}.linear1.weight" for l in range(len(m.layers))]
        ef = os.path.join(self.tmp, "eps.json")
        with open(ef, "w") as f:
            json.dump({n: float(e) for n, e in zip(names, eps_per_layer)}, f)
        out = os.path.join(self.tmp, "base.onnx")
        rep = compress_model(path, out, eps=0.0, eps_file=ef, linkage=self.linkage)
        by = {ly["weight"]: ly for ly in rep["layers"]}
        labs = [labels_from_fibers(by[n]["fibers"], ly.linear1.out_features) for n, ly in zip(names, m.layers)]
        small = tf_ff_merge(m, labs)
        return small, out


def logit_check(m_torch, onnx_path, x):
    import torch

    from fibgraph.importers.api import session

    s = session(onnx_path)
    a = s.run(None, {s.get_inputs()[0].name: x.astype(np.float32)})[0]
    with torch.no_grad():
        b = m_torch(torch.from_numpy(x.astype(np.float32))).numpy()
    return float(np.max(np.abs(a - b)))


def greedy(m, comp, cal, tau, steps, loss_fn):
    """Algorithm 3 on the FF layers of ``m``: per layer in order, the largest
    eps (bisection) with cal loss <= (1 + tau) * loss of ``m``."""
    base = loss_fn(m, cal)[0]
    eps = [0.0] * len(m.layers)
    for l in range(len(m.layers)):
        lo, hi = 0.0, EPS_HI
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            trial = list(eps)
            trial[l] = mid
            small, _ = comp(m, trial)
            if loss_fn(small, cal)[0] <= (1 + tau) * base:
                lo = mid
            else:
                hi = mid
        eps[l] = lo
    return eps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--q", type=float, default=1.05)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--tau", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--max-iters", type=int, default=20)
    ap.add_argument("--retune-lr", type=float, default=1e-3)
    ap.add_argument("--max-q-power", type=int, default=30,
                    help="largest j tried in eps * q^j when eps * q merges nothing more")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--replot", action="store_true")
    args = ap.parse_args(argv)
    if args.replot:
        with open(os.path.join(RESULTS, f"study_retune_transformer{args.tag}.json")) as f:
            plot(json.load(f), os.path.join(FIG, f"retune_transformer{args.tag}.png"))
        return
    import torch

    from fibgraph.importers.torch_base import module_loss, retune

    torch.set_num_threads(2)
    clock = timer()
    train, val, check, test = digits_seq_split(args.seed, val=200, check=200)
    max_iters = args.max_iters if not args.quick else 2
    steps = args.steps if not args.quick else 4
    torch.manual_seed(args.seed)
    m0 = TfNet()
    info = retune(m0, train, val, lr=3e-3, batch=64, max_epochs=80 if not args.quick else 10, patience=5,
                  seed=args.seed)
    P0 = n_params(m0)
    L0c, _ = module_loss(m0, check)
    L0t, A0t = module_loss(m0, test)
    print(f"trained: P={P0:,}, {info['epochs']} epochs (best {info['best_epoch']}), test loss {L0t:.4f} "
          f"acc {A0t:.3f}, check loss {L0c:.4f} ({clock():.0f} s)", flush=True)
    out = {"setting": {"data": "scikit-learn digits as 8-step sequences: 947 train / 200 val / 200 check / 450 test "
                               f"(stratified, seed {args.seed})",
                       "model": "TfNet d 32, 4 heads, ff 64, 2 post-norm layers", "q": args.q, "rho": args.rho,
                       "tau": args.tau, "bisection_steps": steps, "max_q_power": args.max_q_power, "max_iters": max_iters,
                       "retune_lr": args.retune_lr, "train": "Adam lr 3e-3 batch 64, early stopping patience 5",
                       "retune": "Adam batch 64, early stopping patience 3, at most 30 epochs",
                       "linkage": "complete", "seed": args.seed,
                       "machine": {"nproc": os.cpu_count(), "torch_threads": torch.get_num_threads()}},
           "trained": {"params": P0, "test_loss": L0t, "test_acc": A0t, "check_loss": L0c,
                       "epochs": info["epochs"], "best_epoch": info["best_epoch"]}}
    with tempfile.TemporaryDirectory() as tmp:
        comp = FFCompressor(tmp)
        # one-shot compression of the trained model, no retuning
        oneshot, seen = [], set()
        for e in (np.arange(0.3, 1.95, 0.05) if not args.quick else [0.6, 1.0, 1.4]):
            small, onnx_base = comp(m0, [float(e)] * len(m0.layers))
            ff = tuple(ly.linear1.out_features for ly in small.layers)
            if ff in seen:
                continue
            seen.add(ff)
            lt, at = module_loss(small, test)
            oneshot.append({"eps": round(float(e), 3), "ff": list(ff), "params": n_params(small), "test_loss": lt,
                            "test_acc": at, "torch_vs_onnx": logit_check(small, onnx_base, test[0])})
        print("one-shot: " + ", ".join(f"ff {r['ff']} P {r['params']:,} L {r['test_loss']:.3f}" for r in oneshot),
              flush=True)
        out["oneshot"] = oneshot
        # Algorithm 2
        m = copy.deepcopy(m0)
        hist = []
        stopped = f"max_iters={max_iters}"
        for it in range(max_iters):
            t0 = time.perf_counter()
            eps = greedy(m, comp, check, args.tau, steps, module_loss)
            lossless, _ = comp(m, eps)
            # over-compress with eps * q; where that merges nothing more (the
            # partition has not changed), eps * q^j with the smallest j that does
            for j in range(1, args.max_q_power + 1):
                over = [min(EPS_HI, e * args.q ** j) for e in eps]
                small, onnx_base = comp(m, over)
                if n_params(small) < n_params(lossless):
                    break
            chk = logit_check(small, onnx_base, test[0])
            Lb_c = module_loss(small, check)[0]
            Lb_t, Ab_t = module_loss(small, test)
            r = retune(small, train, val, lr=args.retune_lr, batch=64, max_epochs=30, patience=3,
                       seed=args.seed + it + 1)
            Lc = module_loss(small, check)[0]
            Lt, At = module_loss(small, test)
            rec = {"iter": it, "params_start": n_params(m), "ff_start": [ly.linear1.out_features for ly in m.layers],
                   "eps": eps, "eps_over": over, "q_power": j, "params_lossless": n_params(lossless),
                   "ff_over": [ly.linear1.out_features for ly in small.layers], "params_over": n_params(small),
                   "check_loss_over": Lb_c, "test_loss_over": Lb_t, "test_acc_over": Ab_t,
                   "check_loss_retuned": Lc, "test_loss_retuned": Lt, "test_acc_retuned": At,
                   "epochs": r["epochs"], "best_epoch": r["best_epoch"], "torch_vs_onnx": chk,
                   "accepted": bool(Lc <= (1 + args.rho) * L0c), "seconds": round(time.perf_counter() - t0, 1)}
            hist.append(rec)
            print(f" iter {it}: ff {rec['ff_start']} eps {[round(e, 3) for e in eps]} -> over ff {rec['ff_over']} "
                  f"P {rec['params_over']:,}: check {Lb_c:.4f} -> retuned {Lc:.4f} "
                  f"(limit {(1 + args.rho) * L0c:.4f}, {'ok' if rec['accepted'] else 'rejected'}), test "
                  f"{Lb_t:.4f} -> {Lt:.4f}, acc {At:.3f}, {r['epochs']} ep, {rec['seconds']} s "
                  f"(torch check {chk:.1e}; {clock():.0f} s)", flush=True)
            if not rec["accepted"]:
                stopped = f"check loss {Lc:.4g} > (1 + rho) * {L0c:.4g}"
                break
            if rec["params_over"] >= rec["params_start"]:
                m = small
                stopped = "over-compression no longer shrinks the model"
                break
            m = small
        final_eps = greedy(m, comp, check, args.tau, steps, module_loss)
        final, _ = comp(m, final_eps)
        Lf_t, Af_t = module_loss(final, test)
        out["history"] = hist
        out["stopped"] = stopped
        out["final"] = {"params": n_params(final), "ff": [ly.linear1.out_features for ly in final.layers],
                        "eps": final_eps, "test_loss": Lf_t, "test_acc": Af_t,
                        "check_loss": module_loss(final, check)[0]}
        out["compress_calls"] = comp.calls
    print(f"final: ff {out['final']['ff']} P {out['final']['params']:,} ({out['final']['params'] / P0:.1%}), "
          f"test loss {Lf_t:.4f} acc {Af_t:.3f}; stopped: {stopped}", flush=True)
    pts = {"oneshot": [(P0, L0t)] + [(r["params"], r["test_loss"]) for r in out["oneshot"]],
           "before_retune": [(P0, L0t)] + [(h["params_over"], h["test_loss_over"]) for h in hist],
           "after_retune": [(P0, L0t)] + [(h["params_over"], h["test_loss_retuned"]) for h in hist]}
    fits = {}
    for k, v in pts.items():
        a, l0 = fit_alpha([p for p, _ in v], [l for _, l in v])
        fits[k] = {"alpha": a, "L0": l0, "n_points": len(v), "P_range": [min(p for p, _ in v), max(p for p, _ in v)]}
    out["fits"] = fits
    out["seconds"] = round(clock(), 1)
    os.makedirs(RESULTS, exist_ok=True)
    save_json(out, os.path.join(RESULTS, f"study_retune_transformer{args.tag}.json"))
    plot(out, os.path.join(FIG, f"retune_transformer{args.tag}.png"))
    md = table(out)
    with open(os.path.join(RESULTS, f"study_retune_transformer{args.tag}.md"), "w") as f:
        f.write(md)
    print(md)


def table(out):
    s = out["setting"]
    t = out["trained"]
    lines = ["##### Compress-retune (Algorithm 2) on a small Transformer, digits sequences\n",
             f"Setting: {s['data']}; {s['model']}; {s['train']}; q {s['q']}, rho {s['rho']}, tau {s['tau']}, "
             f"{s['bisection_steps']} bisection steps, retuning lr {s['retune_lr']:g} ({s['retune']}); "
             f"trained model: P {t['params']:,}, test loss {t['test_loss']:.4f}, acc {100 * t['test_acc']:.1f}%, "
             f"check loss {t['check_loss']:.4f} (limit {(1 + s['rho']) * t['check_loss']:.4f}).\n",
             "| iter | FF units start | greedy eps | FF over | P over | kept | check loss over -> retuned | "
             "test loss over -> retuned | test acc over -> retuned | epochs | q^j | accepted |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for h in out["history"]:
        lines.append(f"| {h['iter']} | {'-'.join(map(str, h['ff_start']))} | "
                     f"{', '.join(f'{e:.3f}' for e in h['eps'])} | {'-'.join(map(str, h['ff_over']))} | "
                     f"{h['params_over']:,} | {h['params_over'] / t['params']:.1%} | "
                     f"{h['check_loss_over']:.4f} -> {h['check_loss_retuned']:.4f} | "
                     f"{h['test_loss_over']:.4f} -> {h['test_loss_retuned']:.4f} | "
                     f"{100 * h['test_acc_over']:.1f} -> {100 * h['test_acc_retuned']:.1f} | {h['epochs']} | {h['q_power']} | "
                     f"{'yes' if h['accepted'] else 'no'} |")
    f = out["final"]
    lines += ["", "'q^j': the power of q used for the over-compression (1 = the paper's eps * q).", "",
              f"Stopped: {out['stopped']}. Returned model (last accepted, compressed once more with its greedy "
              f"eps {', '.join(f'{e:.3f}' for e in f['eps'])}): FF {'-'.join(map(str, f['ff']))}, P {f['params']:,} "
              f"({f['params'] / t['params']:.1%}), test loss {f['test_loss']:.4f}, acc {100 * f['test_acc']:.1f}%.", "",
              "One-shot compression of the trained model (no retuning):\n",
              "| eps | FF units | P | kept | test loss | test acc |", "|---|---|---|---|---|---|"]
    for r in out["oneshot"]:
        lines.append(f"| {r['eps']:g} | {'-'.join(map(str, r['ff']))} | {r['params']:,} | "
                     f"{r['params'] / t['params']:.1%} | {r['test_loss']:.4f} | {100 * r['test_acc']:.1f} |")
    lines += ["", "Fit L = L0 * P^-alpha (test cross-entropy; each set includes the trained model):\n",
              "| points | n | P range | alpha | L0 |", "|---|---|---|---|---|"]
    for k, v in out["fits"].items():
        a = "-" if v["alpha"] is None else f"{v['alpha']:.3f}"
        l0 = "-" if v["L0"] is None else f"{v['L0']:.3g}"
        lines.append(f"| {k.replace('_', ' ')} | {v['n_points']} | {v['P_range'][0]:,}-{v['P_range'][1]:,} | {a} | {l0} |")
    lines += ["", "Paper (seq2seq Transformer on Multi30k): alpha 0.028 -> 0.049.", ""]
    return "\n".join(lines)


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fibgraph.figures import paper_rc, save_figure

    plt.rcParams.update(paper_rc())
    fig, ax = plt.subplots(figsize=(6.6, 4.6))
    t = out["trained"]
    sets = {"oneshot": ([r["params"] for r in out["oneshot"]], [r["test_loss"] for r in out["oneshot"]],
                        "tab:blue", "o", "one-shot compression"),
            "before_retune": ([h["params_over"] for h in out["history"]], [h["test_loss_over"] for h in out["history"]],
                              "tab:gray", "v", "over-compressed, before retune"),
            "after_retune": ([h["params_over"] for h in out["history"]],
                             [h["test_loss_retuned"] for h in out["history"]], "tab:red", "s", "after retune")}
    # the points only: one-shot compression is flat, then jumps (not a power law), so no fitted
    # line is drawn; the fits stay in the tables with their caveats
    for P, L, c, mk, lab in sets.values():
        ax.plot(P, L, mk, color=c, ms=4, label=lab)
    for h in out["history"]:
        ax.annotate("", xy=(h["params_over"], h["test_loss_retuned"]), xytext=(h["params_over"], h["test_loss_over"]),
                    arrowprops=dict(arrowstyle="->", color="0.7", lw=0.6))
    ax.plot([t["params"]], [t["test_loss"]], "*", color="k", ms=10, label="trained")
    f = out["final"]
    ax.plot([f["params"]], [f["test_loss"]], "D", color="tab:green", ms=6, mfc="none", label="returned model")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_xlabel("parameters P")
    ax.set_ylabel("test cross-entropy L")
    s = out["setting"]
    ax.set_title(f"Transformer (d 32, ff 64, 2 layers) on digits sequences; FF units compressed;\n"
                 f"Alg. 2 q={s['q']}, rho={s['rho']}, tau={s['tau']}, retune lr {s['retune_lr']:g}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
