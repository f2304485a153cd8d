"""Independent float64 NumPy implementations of the jaxpref losses, for tests only.

Written directly from the formulas (loops over positions, probabilities rather than the JAX code's
log-space tricks) so that they share no code or structure with jaxpref.losses.
"""

from __future__ import annotations

import math

import numpy as np


def lse(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore"):  # an all -inf row gives NaN; callers mask such rows
        return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def log_sigmoid(x):
    x = np.asarray(x, np.float64)
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return np.exp(log_sigmoid(x))


def finite_diff_grad(f, x, eps=1e-6):
    """Central finite differences of a scalar float64 function."""
    x = np.array(x, np.float64)
    g = np.zeros_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        hi = f(x)
        flat[i] = old - eps
        lo = f(x)
        flat[i] = old
        gflat[i] = (hi - lo) / (2 * eps)
    return g


# --------------------------------------------------------------------------------------------- logps


def token_logps(logits, labels, temperature=1.0):
    z = np.asarray(logits, np.float64) / temperature
    logp = z - lse(z)[..., None]
    return np.take_along_axis(logp, np.asarray(labels)[..., None], -1)[..., 0]


def cross_entropy(logits, labels, mask, num_items=None):
    nll = -token_logps(logits, labels)
    mask = np.asarray(mask, bool)
    n = num_items if num_items is not None else mask.sum()
    return float((nll * mask).sum() / max(n, 1))


# ------------------------------------------------------------------------------------------------ KD


def _zscore(x, base):
    x = np.asarray(x, np.float64)
    std = math.sqrt(max(x.var(), 1e-9))
    return (x - x.mean()) / std / base


def kd_topk(
    student_logits,
    ids,
    target_logprobs,
    mask,
    *,
    temperature=1.0,
    beta=0.0,
    normalize_topk=False,
    zscore_base_temp=None,
    num_items=None,
):
    """Brute force over positions: full-vocabulary softmax, gather, divergence over the valid entries.

    Returns (loss, metrics dict).
    """
    z = np.asarray(student_logits, np.float64)
    V = z.shape[-1]
    K = np.asarray(ids).shape[-1]
    z = z.reshape(-1, V)
    ids = np.asarray(ids).reshape(-1, K)
    lp = np.asarray(target_logprobs, np.float64).reshape(-1, K)
    mask = np.asarray(mask, bool)
    if mask.shape != np.asarray(target_logprobs).shape:
        mask = np.broadcast_to(mask[..., None], np.asarray(target_logprobs).shape)
    mask = mask.reshape(-1, K)
    T = temperature
    total = entropy = mass = agree = 0.0
    count = 0
    for t in range(z.shape[0]):
        valid = [k for k in range(K) if mask[t, k] and lp[t, k] != -np.inf]
        if not valid:
            continue
        count += 1
        q_full = np.exp(z[t] / T - lse(z[t] / T))  # softmax over the vocabulary
        ids_v = ids[t, valid]
        if zscore_base_temp is not None:
            ta = _zscore(lp[t, valid], zscore_base_temp)
            p = np.exp(ta - lse(ta))
            sa = _zscore(z[t, ids_v] / T, zscore_base_temp)
            q = np.exp(sa - lse(sa))
        else:
            p = np.exp(lp[t, valid])
            p = p / p.sum()
            q = q_full[ids_v]
            if normalize_topk:
                q = q / q.sum()
        if beta == 0.0:
            d = np.sum(p * np.log(p / q))
        elif beta == 1.0:
            d = np.sum(q * np.log(q / p))
        else:
            m = beta * p + (1 - beta) * q
            d = beta * np.sum(p * np.log(p / m)) + (1 - beta) * np.sum(q * np.log(q / m))
        total += d
        entropy += -np.sum(p * np.log(p))
        mass += q_full[ids_v].sum()
        agree += float(np.argmax(z[t, ids_v]) == np.argmax(lp[t, valid]))
    n = num_items if num_items is not None else count
    n = n if n > 0 else 1
    loss = T * T * total / n
    return loss, {
        "kd_loss": loss,
        "teacher_entropy": entropy / n,
        "student_topk_mass": mass / n,
        "top1_agreement": agree / n,
    }


def trainable_count(mask):
    return int(np.asarray(mask, bool).sum())


# ---------------------------------------------------------------------------------------- preference


def dpo(
    pc,
    pr,
    rc,
    rr,
    *,
    beta=0.1,
    loss_type="sigmoid",
    label_smoothing=0.0,
    chosen_lengths=None,
    rejected_lengths=None,
    loss_weights=None,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    discopop_tau=0.05,
):
    pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
    b, e = beta, label_smoothing
    zc, zr = pc - rc, pr - rr

    def score(x):
        if f_divergence_type == "reverse_kl":
            return x
        if f_divergence_type == "forward_kl":
            return 1 - np.exp(-x)
        if f_divergence_type == "js_divergence":
            # log(2t / (t + 1)) with t = exp(x)
            return np.log(2 * np.exp(x) / (np.exp(x) + 1))
        a = f_alpha_divergence_coef
        return (np.exp((a - 1) * x) - 1) / (a - 1)

    sc, sr = score(zc), score(zr)
    d = sc - sr
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = loss_weights or [1.0] * len(types)
    total = 0.0
    for t, w in zip(types, weights):
        if t == "sigmoid":
            per = -log_sigmoid(b * d)
        elif t == "hinge":
            per = np.maximum(0.0, 1 - b * d)
        elif t == "ipo":
            lc, lr = np.maximum(chosen_lengths, 1), np.maximum(rejected_lengths, 1)
            per = (sc / lc - sr / lr - 1 / (2 * b)) ** 2
        elif t == "exo_pair":
            qw, ql = sigmoid(b * d), sigmoid(-b * d)
            per = qw * np.log(qw / (1 - e)) + ql * np.log(ql / e)
        elif t == "nca_pair":
            per = -log_sigmoid(b * zc) - 0.5 * log_sigmoid(-b * zc) - 0.5 * log_sigmoid(-b * zr)
        elif t == "robust":
            per = ((1 - e) * -log_sigmoid(b * d) - e * -log_sigmoid(-b * d)) / (1 - 2 * e)
        elif t == "bco_pair":
            per = -log_sigmoid(b * zc) - log_sigmoid(-b * zr)
        elif t == "sppo_hard":
            per = (zc - 1 / (2 * b)) ** 2 + (zr + 1 / (2 * b)) ** 2
        elif t in ("aot", "aot_unpaired"):
            if t == "aot":
                delta = np.sort(pc - pr) - np.sort(rc - rr)
            else:
                delta = np.sort(zc) - np.sort(zr)
            per = -(1 - e) * log_sigmoid(b * delta) - e * log_sigmoid(-b * delta)
        elif t == "apo_zero":
            per = 1 - sigmoid(b * zc) + sigmoid(b * zr)
        elif t == "apo_down":
            per = sigmoid(b * zc) + 1 - sigmoid(b * (zc - zr))
        elif t == "discopop":
            x = b * d
            w_mod = sigmoid(x / discopop_tau)
            per = -log_sigmoid(x) * (1 - w_mod) + np.exp(-x) * w_mod
        elif t == "sft":
            per = np.full_like(pc, -pc.sum() / np.sum(chosen_lengths))
        elif t == "sigmoid_norm":
            lc, lr = np.maximum(chosen_lengths, 1), np.maximum(rejected_lengths, 1)
            per = -log_sigmoid(b * (sc / lc - sr / lr))
        else:
            raise ValueError(t)
        total += w * per.mean()
    metrics = {
        "rewards/chosen": np.mean(b * zc),
        "rewards/rejected": np.mean(b * zr),
        "rewards/accuracies": np.mean(zc > zr),
        "rewards/margins": np.mean(b * (zc - zr)),
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
    }
    return total, metrics


def orpo(c, r, nll, beta):
    c, r = np.asarray(c, np.float64), np.asarray(r, np.float64)
    log_odds = np.log(np.exp(c) / (1 - np.exp(c))) - np.log(np.exp(r) / (1 - np.exp(r)))
    ratio = log_sigmoid(log_odds)
    return nll - beta * ratio.mean(), {"log_odds_ratio": ratio.mean(), "log_odds_chosen": log_odds.mean()}


def cpo(c, r, *, beta, loss_type, label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0, nll=0.0, cpo_alpha=0.0):
    c, r = np.asarray(c, np.float64), np.asarray(r, np.float64)
    if alpha:
        c_rew = (1 - np.exp(c) ** (-alpha)) / alpha
        r_rew = (1 - np.exp(r) ** (-alpha)) / alpha
    else:
        c_rew, r_rew = c, r
    x = c_rew - r_rew
    e = label_smoothing
    if loss_type == "simpo":
        y = beta * x - simpo_gamma
        per = -(1 - e) * log_sigmoid(y) - e * log_sigmoid(-y)
    elif loss_type == "sigmoid":
        per = -(1 - e) * log_sigmoid(beta * x) - e * log_sigmoid(-beta * x)
    elif loss_type == "hinge":
        per = np.maximum(0, 1 - beta * x)
    else:
        per = (x - 1 / (2 * beta)) ** 2
    return per.mean() + cpo_alpha * nll


def kto(pl, rl, pkl, rkl, desirable, *, beta=0.1, dw=1.0, uw=1.0, loss_type="kto"):
    pl, rl = np.asarray(pl, np.float64), np.asarray(rl, np.float64)
    desirable = np.asarray(desirable, bool)
    kl = max(0.0, float(np.mean(np.asarray(pkl, np.float64) - np.asarray(rkl, np.float64))))
    if loss_type != "kto":
        kl = 0.0
    losses = []
    for i in range(len(pl)):
        z = pl[i] - rl[i]
        if loss_type == "kto":
            loss = 1 - sigmoid(beta * (z - kl)) if desirable[i] else 1 - sigmoid(beta * (kl - z))
        else:
            loss = 1 - sigmoid(beta * z) if desirable[i] else sigmoid(beta * z)
        losses.append((dw if desirable[i] else uw) * loss)
    return float(np.mean(losses)), kl


def reward(c, r, margin=None, coef=None):
    c, r = np.asarray(c, np.float64), np.asarray(r, np.float64)
    m = 0.0 if margin is None else np.asarray(margin, np.float64)
    loss = np.mean(-log_sigmoid(c - r - m))
    if coef is not None:
        loss += coef * np.mean((c + r) ** 2)
    return loss
