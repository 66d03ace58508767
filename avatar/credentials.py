"""C2PA Content Credentials on every video the engine writes (`c2pa-python`).

    signer = CredentialSigner(C2paConfig())                        # the user's certificate, or this install's own
    signer.sign(tmp, "animate", models)                            # in place, before the output appears
    signer.sign(tmp, "dub", models, source=video)                  # "c2pa.edited", the source video as ingredient
    read_credentials(path)                                         # what `avatar verify` reports

The active manifest says what the file is: one action, `c2pa.created` (animate) or `c2pa.opened` +
`c2pa.edited` (dub, whose source video is the manifest's parent ingredient; a source in a format C2PA
cannot read, such as MPEG-PS or Matroska, is named and hashed in the models assertion instead, under
`c2pa.created`), with the digital source type
`trainedAlgorithmicMedia` (IPTC: made by a trained model), the engine as software agent, and an
assertion `org.avatar-engine.models` with the engine version and the sha256 of every model used.

Signing: with the user's certificate chain and private key (PEM; `--c2pa.cert` / `--c2pa.key` or
AVATAR_C2PA_CERT / AVATAR_C2PA_KEY), ES256 for EC P-256 keys, ES384 for P-384, PS256 for RSA, Ed25519
for Ed25519. Without them, with this install's own key: an EC P-256 key and a certificate issued by a
local CA, both made once (the `cryptography` package) and kept in
`$XDG_DATA_HOME/avatar-engine/c2pa/local.pem` (default `~/.local/share/...`). Nobody trusts that CA:
readers validate the signature and say that the signing credential is untrusted. No timestamp
authority is asked (the engine works offline); `.mkv` cannot carry a manifest (C2PA defines none for
Matroska), so a .mkv output needs `--no-c2pa.enabled`.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import tempfile
import typing

from avatar import __version__
from avatar.config import C2paConfig
from avatar.errors import MediaError

SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
MODELS_LABEL = "org.avatar-engine.models"
FORMATS = {".mp4": "video/mp4", ".mov": "video/quicktime"}  # outputs that carry a manifest
INGREDIENT_FORMATS = {**FORMATS, ".m4v": "video/mp4", ".avi": "video/x-msvideo"}  # sources C2PA reads as ingredients
LOCAL_NAME = "avatar-engine local C2PA signer (untrusted)"
SOURCE_LABEL = "source_video"  # a dub's input video, the parent ingredient

PathLike = typing.Union[str, os.PathLike]


def local_store() -> pathlib.Path:
    """Where this install's own key and certificates live (made on first use)."""
    base = os.environ.get("XDG_DATA_HOME") or pathlib.Path.home() / ".local" / "share"
    return pathlib.Path(base) / "avatar-engine" / "c2pa" / "local.pem"


def make_identity(common_name: str = LOCAL_NAME) -> bytes:
    """A new EC P-256 key, a leaf certificate for it (`common_name`) and the local CA that issued it,
    as one PEM bundle (key, leaf, CA). The leaf is what C2PA asks of a signer: digital signature only, the
    document-signing and e-mail-protection purposes, not a CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "avatar-engine local CA (untrusted)"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "avatar-engine, this install")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                                     x509.NameAttribute(NameOID.ORGANIZATION_NAME, "avatar-engine, this install")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ObjectIdentifier("1.3.6.1.5.5.7.3.36"),  # document signing
                                                  ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            + leaf.public_bytes(pem) + ca.public_bytes(pem))


def local_identity() -> typing.Tuple[bytes, bytes]:
    """(certificate chain PEM, private key PEM) of this install's own signer, made on first use (one
    file written atomically, so concurrent first runs agree on one key)."""
    store = local_store()
    try:
        if not store.exists():
            store.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".local.", suffix=".pem", dir=store.parent)  # 0600: the key is private
            with os.fdopen(fd, "wb") as handle:
                handle.write(make_identity())
            try:
                os.link(tmp, store)  # first one wins; a run that lost the race uses the winner's
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        text = store.read_bytes()
    except OSError as exc:
        raise MediaError(f"{store}: cannot keep this install's C2PA signing key there ({exc.strerror}); set XDG_DATA_HOME, "
                         f"give --c2pa.cert and --c2pa.key, or --no-c2pa.enabled") from exc
    split = text.index(b"-----BEGIN CERTIFICATE-----")
    return text[split:], text[:split]


def _algorithm(key_pem: bytes, where: str):
    import c2pa
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise MediaError(f"{where}: not an unencrypted PEM private key ({exc}); give the signing key as PEM") from exc
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algorithms = {256: c2pa.C2paSigningAlg.ES256, 384: c2pa.C2paSigningAlg.ES384, 521: c2pa.C2paSigningAlg.ES512}
        if key.curve.key_size in algorithms:
            return algorithms[key.curve.key_size]
    if isinstance(key, rsa.RSAPrivateKey):
        return c2pa.C2paSigningAlg.PS256
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return c2pa.C2paSigningAlg.ED25519
    raise MediaError(f"{where}: C2PA signs with EC P-256/384/521, RSA or Ed25519 keys, not {type(key).__name__}")


class CredentialSigner:
    """Signs finished videos with a C2PA manifest; the certificate and key are read (or made) once."""

    def __init__(self, config: C2paConfig = C2paConfig()):
        self.config = config
        cert = config.cert or os.environ.get("AVATAR_C2PA_CERT", "")
        key = config.key or os.environ.get("AVATAR_C2PA_KEY", "")
        if bool(cert) != bool(key):
            raise MediaError("C2PA signing needs both a certificate chain and its key (--c2pa.cert and --c2pa.key, "
                             "or AVATAR_C2PA_CERT and AVATAR_C2PA_KEY), or neither (this install's own, untrusted key)")
        if cert:
            for path in (cert, key):
                if not pathlib.Path(path).is_file():
                    raise MediaError(f"{path}: no such file; give the C2PA certificate chain and key as PEM files")
            self.chain, self.key, self.own = pathlib.Path(cert).read_bytes(), pathlib.Path(key).read_bytes(), False
            if b"-----BEGIN CERTIFICATE-----" not in self.chain:
                raise MediaError(f"{cert}: not a PEM certificate chain (leaf first, then its issuers)")
        else:
            (self.chain, self.key), self.own = local_identity(), True
        self.algorithm = _algorithm(self.key, key or str(local_store()))

    @staticmethod
    def check_format(output: PathLike) -> None:
        """One line when `output`'s container cannot carry a manifest."""
        suffix = pathlib.Path(output).suffix.lower()
        if suffix not in FORMATS:
            raise MediaError(f"{output}: a {suffix or 'file without extension'} cannot carry C2PA Content Credentials; "
                             f"write {' or '.join(FORMATS)}, or give --no-c2pa.enabled")

    def manifest(self, command: str, models: typing.Mapping[str, str], ingredient: bool,
                 source: typing.Optional[typing.Dict[str, str]] = None) -> typing.Dict[str, typing.Any]:
        """The manifest's definition. `ingredient`: a dub's video is the parent ingredient (opened,
        then edited); `source`: a source recorded in the models assertion instead (its format is one
        C2PA cannot read as an ingredient)."""
        made = {"action": "c2pa.edited" if ingredient else "c2pa.created", "digitalSourceType": SOURCE_TYPE,
                "softwareAgent": {"name": "avatar-engine", "version": __version__},
                "description": "lip-synced to speech by a trained motion model and face renderer"}
        opened = {"action": "c2pa.opened", "parameters": {"ingredientIds": [SOURCE_LABEL]}}
        record = {"engine": f"avatar {__version__}", "command": command,
                  "models": {name: f"sha256:{digest}" for name, digest in models.items()}}
        if source is not None:
            record["source_video"] = source
        return {
            "claim_generator_info": [{"name": "avatar-engine", "version": __version__}],
            "title": f"Synthetic video (avatar engine {command})",
            "assertions": [
                {"label": "c2pa.actions.v2", "data": {"actions": [opened, made] if ingredient else [made]}},
                {"label": MODELS_LABEL, "data": record},
            ],
        }

    def _builder(self, command: str, models: typing.Mapping[str, str], source: typing.Optional[pathlib.Path]):
        """A c2pa Builder for the manifest, with a dub's `source` video as its parent ingredient where
        C2PA can read that format (MP4, QuickTime, AVI); else the source's name and hash go into the
        models assertion and the action is `c2pa.created`."""
        import c2pa

        if source is None:
            return c2pa.Builder(self.manifest(command, models, ingredient=False))
        builder = c2pa.Builder(self.manifest(command, models, ingredient=True))
        try:
            with open(source, "rb") as stream:
                builder.add_ingredient({"title": source.name, "relationship": "parentOf", "label": SOURCE_LABEL},
                                       INGREDIENT_FORMATS.get(source.suffix.lower(), "video/mp4"), stream)
            return builder
        except c2pa.C2paError:  # a format C2PA does not read (MPEG-PS, Matroska, WebM, ...)
            builder.close()
        from avatar.provenance import file_sha256

        return c2pa.Builder(self.manifest(command, models, ingredient=False,
                                          source={"name": source.name, "sha256": file_sha256(source)}))

    def sign(self, path: PathLike, command: str, models: typing.Mapping[str, str], output_name: PathLike,
             source: typing.Optional[PathLike] = None) -> None:
        """Embed a signed manifest into the finished video at `path` (in place: signed beside it, then
        renamed over it). `output_name`: the name it will have (its container); `source`: a dub's
        input video, its parent ingredient."""
        import c2pa

        fmt = FORMATS[pathlib.Path(output_name).suffix.lower()]
        path = pathlib.Path(path)
        signed = path.with_name(path.name + ".c2pa")
        try:
            signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(self.algorithm, self.chain, self.key, None))
            with self._builder(command, models, pathlib.Path(source) if source is not None else None) as builder:
                with open(path, "rb") as src, open(signed, "w+b") as dst:
                    builder.sign(signer, fmt, src, dst)
            signer.close()
            os.replace(signed, path)
        except c2pa.C2paError as exc:
            why = " ".join(str(exc).split())[:240]
            raise MediaError(f"{output_name}: C2PA signing failed ({why}); check the certificate and key, "
                             f"or give --no-c2pa.enabled") from exc
        finally:
            if signed.exists():
                signed.unlink()


def read_credentials(path: PathLike) -> typing.Dict[str, typing.Any]:
    """The C2PA manifest of `path`, as `avatar verify` reports it: present, validation state
    ("Valid", "Trusted" or "Invalid"), the failures, who signed (and whether that is this install's
    own untrusted signer), the actions with their digital source type, the models assertion, the
    ingredients."""
    import c2pa

    suffix = pathlib.Path(path).suffix.lower()
    result: typing.Dict[str, typing.Any] = {"present": False}
    if suffix not in FORMATS:
        result["why_not"] = f"a {suffix} file cannot carry C2PA"
        return result
    try:
        with open(path, "rb") as stream, c2pa.Reader(FORMATS[suffix], stream) as reader:
            store = json.loads(reader.json())
            state = reader.get_validation_state()
            results = reader.get_validation_results() or {}
    except c2pa.C2paError.ManifestNotFound:
        return result
    except c2pa.C2paError as exc:
        return {"present": True, "validation_state": "Invalid", "errors": [" ".join(str(exc).split()) or type(exc).__name__]}
    active = store.get("manifests", {}).get(store.get("active_manifest", ""), {})
    assertions = {a.get("label"): a.get("data") for a in active.get("assertions", [])}
    actions = (assertions.get("c2pa.actions.v2") or assertions.get("c2pa.actions") or {}).get("actions", [])
    status = results.get("activeManifest", {}) if isinstance(results, dict) else {}
    failures = [f"{item.get('code')}: {item.get('explanation', '')}".strip() for item in status.get("failure", [])]
    signature = active.get("signature_info", {})
    untrusted = any(item.get("code") == "signingCredential.untrusted" for item in status.get("failure", []))
    return {
        "present": True,
        "validation_state": state,
        "errors": [f for f in failures if not f.startswith("signingCredential.untrusted")],
        "signed_by": signature.get("common_name") or signature.get("issuer"),
        "issuer": signature.get("issuer"),
        "local_untrusted_signer": signature.get("common_name") == LOCAL_NAME,
        "credential_untrusted": untrusted,
        "actions": [{"action": a.get("action"), "digitalSourceType": a.get("digitalSourceType")} for a in actions],
        "models": assertions.get(MODELS_LABEL),
        "ingredients": [i.get("title") for i in active.get("ingredients", [])],
        "claim_generator": [g.get("name") for g in active.get("claim_generator_info", [])],
    }
