"""An OPC UA server for the station: `lineside run ... --opcua opc.tcp://127.0.0.1:4840`.

Under Objects, one object named after --station holds variables a PLC or SCADA reads
or subscribes to (names after OPC 40100, Machine Vision, where that is simple):

    State            online / offline
    SourceState      starting / live / reconnecting / ended
    ResultCounter    decisions so far (subscribe to it: it changes with every result)
    LastLabel, LastClassIndex (-1 for unknown), LastConfidence, LastAnomalyScore (an
    anomaly model's score / its threshold, above 1 anomalous; -1 for a classifier), LastVerdict (OK/NG or
    empty), LastResultOK, LastFrame, LastPartId, LastAnswer (JSON of the last triggered
    part's answer)
    OkCount, NgCount, UnknownCount, ModelSha256, LastError

Anonymous clients may read and subscribe, never write or call. With --opcua-user and
a password (LINESIDE_OPCUA_PASSWORD), the object also has a method
Trigger(PartId) for part-triggered inspection (--trigger opcua), which only that user
may call. Without a certificate the endpoint has no encryption (SecurityPolicy None):
keep it on a segment the PLC alone reaches. With --opcua-cert and --opcua-key (the
server's X.509 certificate, DER or PEM, and its RSA private key, PEM) it offers only
Basic256Sha256, signed and encrypted or signed: clients must connect with that policy
and the password travels encrypted. Updates never block the loop: the latest values are handed
to the server's own thread, which writes them at most every 20 ms.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import threading
from urllib.parse import urlsplit

from lineside.errors import LinesideError, require
from lineside.text import printable

from .outputs import Output
from .records import DecisionRow, Event

log = logging.getLogger(__name__)

NAMESPACE = "urn:lineside:station"
UPDATE_SECONDS = 0.02


class _RefusalsAreNotErrors(logging.Filter):
    """asyncua logs every request it refuses for want of rights (an anonymous client trying
    to write) as an ERROR: that is the server working as meant, so lineside logs it at
    DEBUG instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "BadUserAccessDenied" in message or "not permitted" in message:
            log.debug("OPC UA request refused: %s", message)
            return False
        return True


def check_endpoint(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "opc.tcp" or not parts.hostname:
        raise LinesideError(f"--opcua {url}: must be opc.tcp://HOST:PORT (for example opc.tcp://127.0.0.1:4840)")
    try:
        return parts.hostname, parts.port or 4840
    except ValueError:
        raise LinesideError(f"--opcua {url}: bad port") from None


class OpcUaOutput(Output):
    """An OPC UA server whose variables show the last decision and the station's state; a
    thread of its own serves them, the loop only sets values."""

    def __init__(self, endpoint: str, station: str, model_sha256: str, labels: list[str], user: str | None = None,
                 password: str | None = None, on_trigger=None, cert: str | None = None, key: str | None = None,
                 on_product=None, on_update=None):
        require("asyncua", "opcua")
        logging.getLogger("asyncua").setLevel(logging.ERROR)    # it reports each refused request as a warning
        processor = logging.getLogger("asyncua.server.uaprocessor")
        if not any(isinstance(f, _RefusalsAreNotErrors) for f in processor.filters):
            processor.addFilter(_RefusalsAreNotErrors())
        self.host, self.port = check_endpoint(endpoint)
        self.endpoint = f"opc.tcp://{self.host}:{self.port}"
        self.station, self.labels = station, list(labels)
        self.model_sha256 = model_sha256
        self.user = user
        self.password = password if password is not None else os.environ.get("LINESIDE_OPCUA_PASSWORD")
        if user is not None and not self.password:
            raise LinesideError(f"--opcua-user {printable(user)}: set its password in LINESIDE_OPCUA_PASSWORD "
                                "(a user without one would log in with any empty password)")
        if on_trigger is not None and not (user and self.password):
            raise LinesideError("--trigger opcua: needs --opcua-user and a password (LINESIDE_OPCUA_PASSWORD): "
                                "anonymous clients may not trigger")
        self.on_trigger = on_trigger
        self.on_product = on_product      # SetProduct(name or index), for the user only (--products)
        self.on_update = on_update        # UpdateModel(bundle folder name), for the user only (--updates)
        self.labels_by_product: dict = {}   # product name -> its labels, for LastClassIndex (--products)
        self._labels_of = None
        if on_product is not None and not (user and self.password):
            raise LinesideError("--opcua with --products: needs --opcua-user and a password "
                                "(LINESIDE_OPCUA_PASSWORD): anonymous clients may not switch products")
        if bool(cert) != bool(key):
            raise LinesideError("--opcua-cert and --opcua-key: give both (the server's certificate and its key)")
        for option, path in (("--opcua-cert", cert), ("--opcua-key", key)):
            if path and not os.path.isfile(path):
                raise LinesideError(f"{option} {path}: no such file")
        self.cert, self.key = cert, key
        self.values = {"State": "online", "SourceState": "starting", "ResultCounter": 0, "LastLabel": "",
                       "LastClassIndex": -1, "LastConfidence": 0.0, "LastAnomalyScore": -1.0, "LastVerdict": "", "LastResultOK": False,
                       "LastFrame": 0, "LastPartId": "", "LastAnswer": "", "OkCount": 0, "NgCount": 0,
                       "UnknownCount": 0, "ModelSha256": model_sha256, "LastError": "", "Product": ""}
        self._dirty = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lineside-opcua", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        except Exception as exc:  # noqa: BLE001 - port in use, bad address...
            self._loop.call_soon_threadsafe(self._loop.stop)
            if isinstance(exc, LinesideError):
                raise
            raise LinesideError(f"--opcua {self.endpoint}: the server could not start ({exc})") from exc
        log.info("OPC UA server on %s, object %s", self.endpoint, station)

    # -- the server's thread --------------------------------------------------------------

    async def _start(self):
        from asyncua import Server, ua
        from asyncua.crypto.permission_rules import USER_TYPES, PermissionRuleset, User, UserRole
        from asyncua.server.user_managers import UserManager

        owner = self

        class Users(UserManager):
            def get_user(self, iserver, username=None, password=None, certificate=None):
                if not username:
                    return User(role=UserRole.Anonymous)
                if (owner.user and owner.password and username == owner.user and isinstance(password, str)
                        and hmac.compare_digest(password.encode(), owner.password.encode())):
                    return User(role=UserRole.User, name=username)
                return None          # a wrong user or password is refused

        class ReadOnlyForAnonymous(PermissionRuleset):
            def __init__(self):
                everything = {ua.NodeId(t) for t in USER_TYPES}
                writes = {ua.NodeId(ua.ObjectIds.WriteRequest_Encoding_DefaultBinary),
                          ua.NodeId(ua.ObjectIds.CallRequest_Encoding_DefaultBinary)}
                self.allowed = {UserRole.User: everything, UserRole.Anonymous: everything - writes}

            def check_validity(self, user, action_type, body):
                return action_type in self.allowed.get(user.role if user else UserRole.Anonymous, set())

        server = Server(user_manager=Users())
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name(f"lineside {self.station}")
        if self.cert:
            try:
                await server.load_certificate(self.cert)
                await server.load_private_key(self.key)
            except Exception as exc:  # noqa: BLE001 - wrong format, wrong password, not a key
                raise LinesideError(f"--opcua-cert {self.cert} / --opcua-key {self.key}: cannot be loaded "
                                    f"({exc.__class__.__name__}: {exc})") from None
            policies = [ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt, ua.SecurityPolicyType.Basic256Sha256_Sign]
        else:
            policies = [ua.SecurityPolicyType.NoSecurity]
        server.set_security_policy(policies, permission_ruleset=ReadOnlyForAnonymous())
        idx = await server.register_namespace(NAMESPACE)
        station = await server.nodes.objects.add_object(idx, self.station)
        kinds = {int: ua.VariantType.Int64, float: ua.VariantType.Double, bool: ua.VariantType.Boolean,
                 str: ua.VariantType.String}
        self.nodes = {}
        for name, value in self.values.items():
            self.nodes[name] = await station.add_variable(idx, name, value, kinds[type(value)])
        await _add_methods(self, station, idx)
        await server.start()
        self.server = server
        self._writer = asyncio.ensure_future(self._write_loop())

    async def _write_loop(self):
        from asyncua import ua

        while True:
            await asyncio.sleep(UPDATE_SECONDS)
            if not self._dirty.is_set():
                continue
            self._dirty.clear()
            for name, value in list(self.values.items()):
                node = self.nodes[name]
                kind = {int: ua.VariantType.Int64, float: ua.VariantType.Double, bool: ua.VariantType.Boolean,
                        str: ua.VariantType.String}[type(value)]
                await node.write_value(ua.Variant(value, kind))

    # -- called by the loop --------------------------------------------------------------

    def decision(self, row: DecisionRow):
        v = self.values
        v["ResultCounter"] += 1
        v["LastLabel"] = row.label
        v["LastClassIndex"] = self.labels.index(row.label) if row.label in self.labels else -1
        v["LastConfidence"] = float(row.confidence)
        v["LastAnomalyScore"] = -1.0 if row.anomaly_score is None else float(row.anomaly_score)
        v["LastVerdict"] = row.verdict or ""
        v["LastResultOK"] = row.verdict == "OK"
        v["LastFrame"] = int(row.frame)
        if row.part_id:
            v["LastPartId"] = row.part_id
        if row.product is not None:
            v["Product"] = row.product
            v["ModelSha256"] = row.model_sha256
        if row.product is not None and row.product != self._labels_of:
            self._labels_of = row.product
            self.labels = list(self.labels_by_product.get(row.product, self.labels))
        self._station_state()

    def event(self, event: Event):
        self._station_state()

    def _station_state(self):
        v, s = self.values, self.state
        v["OkCount"], v["NgCount"], v["UnknownCount"] = s.counts["OK"], s.counts["NG"], s.counts["unknown"]
        v["SourceState"] = s.source_state
        v["LastError"] = (s.last_error or "")[:500]
        self._dirty.set()

    def answer(self, answer):
        import json

        self.values["LastPartId"] = answer.part_id
        self.values["LastAnswer"] = json.dumps(answer.as_dict())
        self._dirty.set()

    def close(self, summary: dict | None = None):
        self._station_state()
        self.values["State"] = "offline"
        self.values["SourceState"] = "ended"
        self._dirty.set()

        async def stop():
            await asyncio.sleep(UPDATE_SECONDS * 3)      # the last values go out first
            self._writer.cancel()
            await self.server.stop()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        except Exception as exc:  # noqa: BLE001
            log.warning("OPC UA server did not stop cleanly: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


async def _add_methods(output: OpcUaOutput, station, idx):
    """The station object's methods Trigger(PartId) and SetProduct(Product), where the run
    takes them."""
    from asyncua import ua

    if output.on_trigger is not None:
        async def trigger(parent, part_id):
            part = output.on_trigger(str(part_id.Value) if part_id is not None and part_id.Value else None)
            return [ua.Variant(part, ua.VariantType.String)]

        arg = ua.Argument()
        arg.Name, arg.DataType, arg.ValueRank = "PartId", ua.NodeId(ua.ObjectIds.String), -1
        await station.add_method(idx, "Trigger", trigger, [arg], [ua.VariantType.String])
    if output.on_product is not None:
        async def set_product(parent, product):
            chosen = output.on_product(str(product.Value) if product is not None else "")
            if chosen is None:
                return [ua.Variant("", ua.VariantType.String)]
            return [ua.Variant(chosen.name, ua.VariantType.String)]

        arg = ua.Argument()
        arg.Name, arg.DataType, arg.ValueRank = "Product", ua.NodeId(ua.ObjectIds.String), -1
        await station.add_method(idx, "SetProduct", set_product, [arg], [ua.VariantType.String])
    if output.on_update is not None:
        async def update_model(parent, name):
            taken = output.on_update(str(name.Value) if name is not None and name.Value else "")
            return [ua.Variant(taken or "", ua.VariantType.String)]

        arg = ua.Argument()
        arg.Name, arg.DataType, arg.ValueRank = "Bundle", ua.NodeId(ua.ObjectIds.String), -1
        await station.add_method(idx, "UpdateModel", update_model, [arg], [ua.VariantType.String])
