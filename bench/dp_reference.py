"""Prints the (epsilon, order) Opacus computes for the settings that
trainer/src/federated/privacy.rs checks its accountant against.

Run: bench/setup-venv.sh && bench/.venv/bin/pip install opacus==1.6.0 && bench/.venv/bin/python bench/dp_reference.py
"""
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant

for q, z, steps, delta in [
    (0.01, 1.1, 10000, 1e-5),
    (0.256, 1.0, 100, 1e-5),
    (0.5, 0.8, 30, 1e-5),
    (1.0, 2.0, 50, 1e-6),
    (0.1, 4.0, 1000, 1e-5),
]:
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=orders)
    eps, order = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    print(f"q={q} z={z} steps={steps} delta={delta}: epsilon={float(eps)!r} order={order}")
