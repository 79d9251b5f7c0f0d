"""GITS prior schedules tabulated by the LD3 paper's code.

GITS (Chen et al., "On the Trajectory Regularity of ODE-based Diffusion Sampling", 2024)
finds few-step time grids by dynamic programming against a many-step teacher. The LD3
code (vinhsuhi/LD3, ``utils.py``) ships the resulting grids as tables of EDM noise
levels ``sigma = sigma(t) / alpha(t) = exp(-lambda(t))``, decreasing, one table per
model family and NFE (a table for NFE ``n`` has ``n + 1`` entries). ``--use_gits`` picks
one as the prior of ``--match_prior``; ``gen_data.py`` can also sample with it.

Two versions of the table exist in the paper's repository:

* commit 2f7467c: keyed by *dataset*, independent of the solver:
  ``cifar10``, ``ffhq``, ``afhqv2`` (EDM pixel models, sigma 80 -> 0.002, NFE 4..10),
  ``lsun`` (LSUN-bedroom latent diffusion, sigma 83.8225 -> 0.0388, NFE 4..10) and
  ``sd`` (Stable Diffusion, sigma 14.6146 -> 0.0292, NFE 3..11). The paper's code picks
  the dataset from ``model`` (edm / latent_diff / conditioned_latent_diff) and, for EDM,
  from the substring of ``ckp_path`` (each model family says which: ``Family.gits_dataset``).
* commit 2d903da: keyed by *solver* (``dpm_solver++``, ``ipndm``, NFE 3..11) regardless of
  the model. Those numbers are Stable Diffusion noise levels (14.6146 -> 0.0292), not EDM
  ones; the ``ipndm`` table is identical to the later ``sd`` table.

Here: EDM and LSUN tables are solver-independent (as in the paper). For Stable Diffusion
the per-solver tables are used for ``dpm_solver++`` and ``ipndm``; any other solver gets
the ``sd`` table of the later version (= the ``ipndm`` one).

Convert a table to times with ``t = t_of_lambda(-log(sigma))``; this is also what the
paper's code does for every model family.
"""

from __future__ import annotations

# --------------------------------------------------------------------------------------
# Tables (numeric data copied from the paper's utils.py, PRIOR_TIMESTEPS).
# --------------------------------------------------------------------------------------

_EDM_CIFAR10 = {
    4: [80.0, 5.1092, 1.584, 0.47, 0.002],
    5: [80.0, 5.8389, 2.1632, 0.8119, 0.2107, 0.002],
    6: [80.0, 9.7232, 3.3686, 1.3482, 0.5666, 0.1698, 0.002],
    7: [80.0, 10.9836, 3.8811, 1.8543, 0.8119, 0.3183, 0.1079, 0.002],
    8: [80.0, 10.9836, 3.8811, 1.8543, 0.9654, 0.47, 0.2107, 0.0665, 0.002],
    9: [80.0, 12.3816, 4.459, 2.1632, 1.1431, 0.5666, 0.2597, 0.1079, 0.03, 0.002],
    10: [80.0, 13.9293, 5.1092, 2.5152, 1.3482, 0.6799, 0.3183, 0.1698, 0.0665, 0.0225, 0.002],
}

_EDM_FFHQ = {
    4: [80.0, 7.5699, 2.1632, 0.5666, 0.002],
    5: [80.0, 9.7232, 2.9152, 0.9654, 0.2597, 0.002],
    6: [80.0, 10.9836, 3.8811, 1.584, 0.5666, 0.1698, 0.002],
    7: [80.0, 12.3816, 4.459, 1.8543, 0.8119, 0.3183, 0.1079, 0.002],
    8: [80.0, 12.3816, 5.1092, 2.1632, 0.9654, 0.47, 0.2107, 0.0665, 0.002],
    9: [80.0, 13.9293, 5.8389, 2.9152, 1.3482, 0.6799, 0.3183, 0.1359, 0.0515, 0.002],
    10: [80.0, 13.9293, 5.8389, 2.9152, 1.584, 0.8119, 0.3878, 0.2107, 0.0851, 0.03, 0.002],
}

_EDM_AFHQV2 = {
    4: [80.0, 7.5699, 2.1632, 0.3878, 0.002],
    5: [80.0, 8.5888, 2.9152, 0.9654, 0.2107, 0.002],
    6: [80.0, 9.7232, 3.8811, 1.584, 0.47, 0.1359, 0.002],
    7: [80.0, 10.9836, 4.459, 1.8543, 0.6799, 0.2597, 0.0851, 0.002],
    8: [80.0, 12.3816, 5.1092, 2.5152, 1.1431, 0.47, 0.2107, 0.0665, 0.002],
    9: [80.0, 13.9293, 5.8389, 2.9152, 1.3482, 0.6799, 0.3183, 0.1359, 0.0515, 0.002],
    10: [80.0, 13.9293, 5.8389, 2.9152, 1.584, 0.8119, 0.3878, 0.2107, 0.1079, 0.0395, 0.002],
}

_LDM_LSUN = {
    4: [83.8225, 2.1307, 0.9556, 0.425, 0.0388],
    5: [83.8225, 2.4793, 1.1629, 0.5745, 0.2411, 0.0388],
    6: [83.8225, 2.4793, 1.2928, 0.7324, 0.3678, 0.1578, 0.0388],
    7: [83.8225, 2.9282, 1.4464, 0.8717, 0.4929, 0.2586, 0.109, 0.0388],
    8: [83.8225, 3.5196, 1.854, 1.1629, 0.7324, 0.425, 0.2249, 0.1009, 0.0388],
    9: [83.8225, 3.5196, 1.854, 1.1629, 0.7324, 0.4574, 0.2773, 0.1578, 0.0731, 0.0388],
    10: [83.8225, 4.3198, 2.1307, 1.2928, 0.8717, 0.5745, 0.3678, 0.2411, 0.1365, 0.0672, 0.0388],
}

_SD_IPNDM = {
    3: [14.6146, 1.7083, 0.532, 0.0292],
    4: [14.6146, 3.1131, 1.0421, 0.3811, 0.0292],
    5: [14.6146, 4.39, 1.5286, 0.6526, 0.2667, 0.0292],
    6: [14.6146, 4.7242, 1.9132, 0.9324, 0.4557, 0.1801, 0.0292],
    7: [14.6146, 6.4477, 2.2797, 1.1629, 0.6114, 0.3058, 0.1258, 0.0292],
    8: [14.6146, 6.4477, 2.7391, 1.4467, 0.8319, 0.4936, 0.2667, 0.1258, 0.0292],
    9: [14.6146, 6.4477, 3.3251, 1.9132, 1.1629, 0.7391, 0.4557, 0.2667, 0.1258, 0.0292],
    10: [14.6146, 5.9489, 3.3251, 2.0267, 1.2969, 0.8319, 0.5712, 0.3811, 0.2255, 0.1258, 0.0292],
    11: [14.6146, 6.4477, 3.8092, 2.2797, 1.5286, 1.0421, 0.7391, 0.4936, 0.3437, 0.2255, 0.1258, 0.0292],
}

_SD_DPMPP = {
    3: [14.6146, 1.5286, 0.4936, 0.0292],
    4: [14.6146, 3.1131, 1.0421, 0.3811, 0.0292],
    5: [14.6146, 4.3900, 1.4467, 0.6114, 0.2255, 0.0292],
    6: [14.6146, 4.3900, 1.8073, 0.8319, 0.3811, 0.1258, 0.0292],
    7: [14.6146, 4.39, 2.0267, 1.0421, 0.5712, 0.3058, 0.1258, 0.0292],
    8: [14.6146, 5.9489, 2.9183, 1.5286, 0.8811, 0.4936, 0.2667, 0.1258, 0.0292],
    9: [14.6146, 6.4477, 3.1131, 1.7083, 1.0421, 0.6526, 0.4183, 0.2667, 0.1258, 0.0292],
    10: [14.6146, 7.6188, 4.0861, 2.4211, 1.4467, 0.9324, 0.6114, 0.3811, 0.2255, 0.1258, 0.0292],
    11: [14.6146, 7.0019, 3.8092, 2.2797, 1.5286, 1.0421, 0.7391, 0.4936, 0.3437, 0.2255, 0.1258, 0.0292],
}

# dataset -> {solver or "*" (any solver) -> {nfe -> sigmas}}
_TABLES: dict[str, dict[str, dict[int, list[float]]]] = {
    "cifar10": {"*": _EDM_CIFAR10},
    "ffhq": {"*": _EDM_FFHQ},
    "afhqv2": {"*": _EDM_AFHQV2},
    "lsun": {"*": _LDM_LSUN},
    "sd": {"dpm_solver++": _SD_DPMPP, "ipndm": _SD_IPNDM, "*": _SD_IPNDM},
}

# Other spellings accepted for the dataset argument (config names, model folders).
_ALIASES = {
    "cifar": "cifar10",
    "cifar-10": "cifar10",
    "afhq": "afhqv2",
    "afhq_v2": "afhqv2",
    "lsun_bedroom": "lsun",
    "lsun_bedrooms": "lsun",
    "latent_diff_lsun": "lsun",
    "stable_diff": "sd",
    "stable_diffusion": "sd",
    "stable_diff_v1-4": "sd",
    "stable_diff_v1-5": "sd",
}

# Value ranges of each family (first and last entries of every table).
SIGMA_RANGE = {
    "cifar10": (80.0, 0.002),
    "ffhq": (80.0, 0.002),
    "afhqv2": (80.0, 0.002),
    "lsun": (83.8225, 0.0388),
    "sd": (14.6146, 0.0292),
}


def _canonical_dataset(dataset: str) -> str:
    key = str(dataset).strip().lower()
    return _ALIASES.get(key, key)


def available_gits() -> dict[str, dict[str, list[int]]]:
    """``{dataset: {solver or '*': [nfe, ...]}}`` of every tabulated schedule."""
    return {ds: {sol: sorted(tab) for sol, tab in by_solver.items()} for ds, by_solver in _TABLES.items()}


def _describe_available() -> str:
    parts = []
    for ds, by_solver in available_gits().items():
        for sol, nfes in by_solver.items():
            who = "any solver" if sol == "*" else sol
            parts.append(f"{ds} ({who}): NFE {nfes[0]}..{nfes[-1]}")
    return "; ".join(parts)


def gits_sigmas(solver_name: str, nfe: int, dataset: str = "cifar10") -> list[float]:
    """The GITS schedule for ``nfe`` network evaluations, as decreasing EDM sigmas.

    Returns a new list of ``nfe + 1`` floats. For the EDM pixel datasets (``cifar10``,
    ``ffhq``, ``afhqv2``) it runs from 80 to 0.002 and does not depend on ``solver_name``;
    ``lsun`` runs 83.8225 -> 0.0388 (solver-independent); ``sd`` runs 14.6146 -> 0.0292,
    with its own table for ``dpm_solver++`` and for ``ipndm`` (other solvers get the
    ``ipndm`` one, as the paper's later code does). Raises ``ValueError`` naming what is
    available when the dataset or the NFE is not tabulated.
    """
    ds = _canonical_dataset(dataset)
    if ds not in _TABLES:
        raise ValueError(
            f"no GITS table for dataset {dataset!r}; available: {_describe_available()}"
        )
    try:
        n = int(nfe)
    except (TypeError, ValueError):
        raise ValueError(f"NFE must be an integer, got {nfe!r}") from None
    if n != nfe:
        raise ValueError(f"NFE must be an integer, got {nfe!r}")
    by_solver = _TABLES[ds]
    solver = str(solver_name).strip().lower() if solver_name is not None else "*"
    table = by_solver.get(solver, by_solver["*"])
    if n not in table:
        which = f"solver {solver_name!r}" if solver in by_solver else "any solver"
        raise ValueError(
            f"no GITS table for {ds} with {which} at NFE {n}; tabulated NFE values there: "
            f"{sorted(table)} (all tables: {_describe_available()})"
        )
    return [float(s) for s in table[n]]


GITS_SOLVERS = ("ipndm", "dpm_solver++")
"""The solvers GITS published schedules for: the solvers it is a baseline of (``ld3.evaluate``)."""


__all__ = ["gits_sigmas", "GITS_SOLVERS", "available_gits", "SIGMA_RANGE"]
