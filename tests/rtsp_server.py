"""A local RTSP server for the stream tests, from Debian's GStreamer packages:

    apt-get install python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good

Run with the system Python that has PyGObject (usually /usr/bin/python3):

    python3 tests/rtsp_server.py PORT        -> rtsp://127.0.0.1:PORT/parts

It serves a live 320x240 MJPEG test pattern at 30 frames per second and prints
"ready" once it accepts clients. Not imported by the test suite: it runs in its
own process so a test can kill it and start it again, as a camera would drop.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

PIPELINE = ("( videotestsrc is-live=true pattern=ball "
            "! video/x-raw,format=I420,width=320,height=240,framerate=30/1 "
            "! jpegenc ! rtpjpegpay name=pay0 pt=26 )")


def main(port: str) -> None:
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(PIPELINE)
    factory.set_shared(True)
    server.get_mount_points().add_factory("/parts", factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main(sys.argv[1])
