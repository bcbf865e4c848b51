"""Several products on one station, switched between two frames: `lineside run --products FILE`.

A products file (YAML) names a bundle per product, each with its own settings:

    products:
      - name: housing-a
        bundle: bundles/housing-a      # relative to this file
        roi: 80,0,480,480
        ok_classes: ok
        reject_below: 0.8
        vote: 2/3
      - name: housing-b
        bundle: bundles/housing-b
        ok_classes: good

A product's index is its place in the list (0, 1, ...). Every bundle is opened and
checked when the run starts (a bundle that fails is a one-line setup error, never a
surprise on the line), so a switch costs no loading: the line chooses the product by the
Modbus ProductRequest register, a message on MQTT's PREFIX/product (a name or an index)
or the status page's POST /api/product (with the token), and the loop switches between
two frames. The rules:

- frames already in flight are decided by the product they were submitted to; the next
  frame taken is decided by the new one, with its own ROI, OK classes, threshold and vote
  (the vote starts afresh);
- every decision in the log names the product that made it (`product`) and its model
  (`model_sha256`), and each switch is a `product_switch` event;
- a trigger waiting at the switch is answered only by frames the new product decides,
  captured after the switch (votes from the old product are discarded), within its
  original timeout: else it gets the fail-safe NG, as always;
- an unknown product name or index is refused with a `product_refused` event (and
  ErrorCode 2 over Modbus); the active product stays.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from lineside.errors import LinesideError
from lineside.text import printable

log = logging.getLogger(__name__)

PRODUCT_KEYS = {"name", "bundle", "roi", "ok_classes", "reject_below", "vote"}
MAX_PRODUCTS = 64


@dataclass(frozen=True)
class ProductSpec:
    """One product of a products file, before its bundle is opened."""
    name: str
    bundle: Path
    roi: str | None = None
    ok_classes: str | None = None
    reject_below: float | None = None
    vote: str | None = None


def read_products(path) -> list[ProductSpec]:
    """A products file -> its products, checked (one-line errors naming the file)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise LinesideError(f"--products {path}: cannot be read ({reason})") from None
    items = doc.get("products") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not items or len(items) > MAX_PRODUCTS:
        raise LinesideError(f"--products {path}: needs a list 'products:' of 1 to {MAX_PRODUCTS} products")
    specs, names = [], set()
    for i, item in enumerate(items):
        where = f"--products {path}: product {i}"
        if not isinstance(item, dict):
            raise LinesideError(f"{where}: must be a mapping with name and bundle")
        extra = sorted(str(k) for k in set(item) - PRODUCT_KEYS)
        if extra:
            raise LinesideError(f"{where}: unknown key(s) {', '.join(extra)} (known: {', '.join(sorted(PRODUCT_KEYS))})")
        name, bundle = item.get("name"), item.get("bundle")
        if not isinstance(name, str) or not name.strip() or name in names:
            raise LinesideError(f"{where}: needs a name of its own")
        if not isinstance(bundle, str) or not bundle.strip():
            raise LinesideError(f"{where} ({name}): needs a bundle")
        reject = item.get("reject_below")
        if reject is not None and not isinstance(reject, (int, float)):
            raise LinesideError(f"{where} ({name}): reject_below must be a number")
        names.add(name)
        text = {k: None if item.get(k) is None else str(item[k]) for k in ("roi", "ok_classes", "vote")}
        specs.append(ProductSpec(name.strip(), (path.parent / bundle).resolve(), reject_below=reject, **text))
    return specs


@dataclass
class Product:
    """A product ready to decide: its model, engine, decider and ROI."""
    index: int
    name: str
    model: object          # RuntimeModel
    decider: object        # Decider
    roi: tuple | None
    engine: object = None  # made by the loop once, for its hint
    settings: object = None  # what its decider was made from (ok_classes, reject_below, vote): an update keeps them


class ProductSwitch:
    """The active product, and a request for another that the loop takes between frames.
    request() may come from any thread (Modbus, MQTT, the page); the loop calls take()."""

    def __init__(self, products: list[Product], active: int = 0):
        self.products = products
        self.active = products[active]
        self._wanted: Product | None = None
        self._asked_at = 0.0
        self._lock = threading.Lock()
        self.listeners: list = []       # (product, error) -> None, called after each switch or refusal
        self.switches = 0
        self.refused = 0
        self.updates = 0
        self.on_event = lambda kind, detail: None
        self.hint = "latency"          # the loop's engine hint, for the engines of updates
        self.retired: list[Product] = []   # replaced by an update, kept until the new one has decided
        self._stale: list[Product] = []    # retired, then replaced again before that: released at once
        self.previous: Product | None = None   # replaced by a promotion or rollback: what a rollback brings back
        self._keep_old = False
        self.decided_since_update = 0

    def find(self, key) -> Product | None:
        """A product by index (int or digits) or name."""
        text = printable(key).strip()
        if text.isdigit() and int(text) < len(self.products):
            return self.products[int(text)]
        return next((p for p in self.products if p.name == text), None)

    def request(self, key) -> Product | None:
        """Ask for a product (any thread). None, with a product_refused event, when there is
        no such product; the active one stays."""
        product = self.find(key)
        if product is None:
            self.refused += 1
            self.on_event("product_refused", f"no product {printable(key)[:80]!r} (known: "
                                             f"{', '.join(p.name for p in self.products)}); "
                                             f"{self.active.name} stays active")
            for listener in self.listeners:
                listener(self.active, True)
            return None
        with self._lock:
            self._wanted = product
            self._asked_at = time.perf_counter()
        return product

    def take(self) -> tuple[Product, float] | None:
        """(the product to switch to, when it was asked for), or None: the loop's call."""
        if self._wanted is None:
            return None
        with self._lock:
            wanted, self._wanted = self._wanted, None
        if wanted is None or wanted is self.active:
            return None
        return wanted, self._asked_at

    def replace(self, product: Product, keep_old: bool = False):
        """An update, a promotion or a rollback (any thread): `product`, its engine made,
        takes the active product's place at the next frame. The old one stays loaded until
        release_retired(), or with keep_old as `previous`, for a rollback."""
        product.index, product.name = self.active.index, self.active.name
        with self._lock:
            self._wanted = product
            self._keep_old = keep_old
            self._asked_at = time.perf_counter()

    def switched(self, product: Product):
        """The loop switched (its thread)."""
        if product not in self.products:         # an update: it takes the old one's place
            old = self.products[product.index]
            self.products[product.index] = product
            if self._keep_old:
                self.previous = old
            else:
                # Only the model just replaced is kept: one retired before it (updates faster
                # than RELEASE_AFTER frames apart) has no frame in flight after the drain, and
                # keeping every one held 100 models (3.5 GB) after 100 quick updates.
                with self._lock:
                    self._stale.extend(self.retired)
                    self.retired = [old]
                self.decided_since_update = 0
            self.updates += 1
        self.active = product
        self.switches += 1
        for listener in self.listeners:
            listener(product, False)

    def decided(self):
        """A frame decided (the loop's thread): counts the new model's first frames."""
        if self.retired:
            self.decided_since_update += 1

    def release_retired(self, after: int) -> int:
        """Drop the models an update replaced once the new one has decided `after` frames,
        and at once those replaced before that one (any thread but the loop's): their
        memory goes back. Returns how many."""
        with self._lock:
            gone, self._stale = self._stale, []
            if self.retired and self.decided_since_update >= after:
                gone, self.retired = gone + self.retired, []
        for product in gone:
            product.engine = product.model = product.decider = None
        return len(gone)


def open_products(path, backend: str, precision: str, device: str, threads, open_model, make_decider) -> list:
    """Every product of the file opened and checked: bundle, ROI, OK classes, vote."""
    from .loop import parse_roi

    products = []
    for i, spec in enumerate(read_products(path)):
        try:
            model = open_model(spec.bundle, backend=backend, precision=precision, device=device, threads=threads)
            decider = make_decider(model, spec)
            roi = parse_roi(spec.roi)
        except LinesideError as exc:
            raise LinesideError(f"--products {path}: product {spec.name}: {exc}") from None
        products.append(Product(i, spec.name, model, decider, roi, settings=spec))
    return products
