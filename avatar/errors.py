"""Errors a user can fix. Each message is one line: what is wrong and what to do about it."""


class AvatarError(Exception):
    """Base class for user-facing errors; the CLI prints `error: <message>` and exits with 2."""


class MediaError(AvatarError):
    """A video, audio or image file cannot be read or written as asked."""


class FaceError(AvatarError):
    """No usable face, or no unambiguous face, in the input."""


class NoFaceError(FaceError):
    pass


class FaceTooSmallError(FaceError):
    pass


class SeveralFacesError(FaceError):
    pass
