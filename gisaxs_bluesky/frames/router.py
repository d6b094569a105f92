"""One run's documents -> its frames: the one event <-> frame pairing of the package."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from event_model import DocumentRouter, Filler, unpack_event_page

from .geometry import geometry_summary
from .readers import FrameReaders
from .record import FrameRef, as_float, find_image_key, image_shape, scanned_motors

__all__ = ["GeometryResolver", "RunFrames", "RunFramesOptions"]

logger = logging.getLogger(__name__)

#: (start document, descriptor document, event) -> the frame's geometry record (or None)
GeometryResolver = Callable[[Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]], Any]


@dataclass(frozen=True)
class RunFramesOptions:
    """Which frames of a run: the image key (default: the 2-D data key of the descriptor) of
    the stream ``stream_name`` (default: the first stream with an image), how a frame's
    geometry is found (``geometry``; None: frames carry no geometry) and which readings are
    its motor positions (``motors``; None: the start document's ``motors`` or hints)."""

    image_key: str | None = None
    stream_name: str | None = None
    geometry: GeometryResolver | None = None
    motors: tuple[str, ...] | None = None  # positions recorded (None: the start's motors)


@dataclass
class ImageStream:
    name: str
    image_key: str
    shape: tuple[int, int] | None
    descriptor: dict


class RunFrames(DocumentRouter):
    """Routes one run's documents and hands each frame of its image stream to ``emit``.

    Problems that concern the run (an unknown descriptor, a duplicate seq_num, an image key
    missing from the descriptor) go to ``note`` with a message naming them; a frame that
    cannot be had is emitted with ``error`` set, so it still gets a row.
    """

    def __init__(
        self,
        start: Mapping[str, Any],
        *,
        emit: Callable[[FrameRef], None],
        readers: FrameReaders,
        options: RunFramesOptions | None = None,
        note: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(start, Mapping) or not start.get("uid"):
            raise ValueError(f"start document without a uid: {start!r}")
        self.start_doc = dict(start)
        self.uid = str(start["uid"])
        self.options = options or RunFramesOptions()
        self.motors = (list(self.options.motors) if self.options.motors is not None
                       else scanned_motors(start))
        self.readers = readers
        self._emit_cb = emit
        self._note_cb = note or (lambda message: logger.warning("run %s: %s", self.uid, message))
        self.streams: dict[str, ImageStream] = {}  # descriptor uid -> image stream
        self.image_stream: str | None = None  # the name of the stream being binned
        self.other_descriptors: set[str] = set()
        self._stream_resources: dict[str, dict] = {}
        self._datums: dict[str, dict] = {}
        self._resources: dict[str, dict] = {}
        self._filler = Filler(readers.handler_registry, root_map=readers.root_map, inplace=False,
                              datum_cache=self._datums, resource_cache=self._resources)
        self._datum_frames: dict[tuple[str, int], tuple[Callable[[], np.ndarray], str]] = {}
        self._waiting: dict[tuple[str, int], tuple[float, dict[str, float], dict]] = {}
        self._seen: set[tuple[str, int]] = set()
        self.paths: set[str] = set()  # files this run reads (released when it is done)
        self.n_frames = 0
        # the first frame's geometry, as the derived node's metadata records it (None: the
        # frames carry none)
        self.geometry_summary: dict | None = None
        self._starts_seen = 0
        self.stop_doc: dict | None = None

    # ------------------------------------------------------------------------------- helpers
    def note(self, message: str) -> None:
        self._note_cb(message)

    def _emit(self, frame: FrameRef) -> None:
        self.n_frames += 1
        self._emit_cb(frame)

    @property
    def expected_shape(self) -> tuple[int, int] | None:
        """The image shape the first image descriptor declares (None when unknown)."""
        for stream in self.streams.values():
            return stream.shape
        return None

    def _frame_metadata(self, stream: ImageStream, event: Mapping[str, Any]) -> tuple[dict, str | None]:
        md = {"stream": stream.name, "image_key": stream.image_key,
              "descriptor": stream.descriptor["uid"], "geometry": None}
        resolver = self.options.geometry
        if resolver is None:
            return md, None
        try:
            md["geometry"] = resolver(self.start_doc, stream.descriptor, event)
        except Exception as exc:  # noqa: BLE001 - named on the frame's row, run goes on
            return md, f"frame seq_num={event.get('seq_num')}: geometry: {exc}"
        if self.geometry_summary is None:
            self.geometry_summary = geometry_summary(md["geometry"])
        return md, None

    # ----------------------------------------------------------------------------- documents
    def start(self, doc: dict) -> None:
        # the start document made this router; a router factory (RunRouter) routes it here too
        if self._starts_seen:
            self.note("start document received twice; the second is ignored")
        self._starts_seen += 1

    def descriptor(self, doc: dict) -> None:
        data_keys = doc.get("data_keys") or {}
        name = doc.get("name", "primary")
        want_key, want_stream = self.options.image_key, self.options.stream_name
        key = want_key if want_key is not None else find_image_key(data_keys)
        if key is None or key not in data_keys:
            if want_key is not None and want_stream in (None, name):
                self.note(f"stream {name!r}: image_key {want_key!r} not in data keys "
                          f"{sorted(data_keys)}")
            self.other_descriptors.add(doc["uid"])
            return
        if want_stream is not None and name != want_stream:
            self.other_descriptors.add(doc["uid"])
            return
        if self.image_stream is not None and self.image_stream != name:
            logger.info("run %s: ignoring image stream %r (binning %r)", self.uid, name,
                        self.image_stream)
            self.other_descriptors.add(doc["uid"])
            return
        self.image_stream = name
        self.streams[doc["uid"]] = ImageStream(name, key, image_shape(data_keys[key]), dict(doc))
        self._filler.descriptor(doc)

    def event_page(self, doc: dict) -> None:
        uid = doc.get("descriptor")
        stream = self.streams.get(uid)
        if stream is None:
            if uid not in self.other_descriptors:
                seqs = list(doc.get("seq_num") or [])
                self.note(f"events seq_num={seqs[:10]} refer to descriptor {uid!r}, which this "
                          f"run has not seen (an event before its descriptor?); not binned")
            return
        for event in unpack_event_page(doc):
            try:
                self._on_event(stream, event)
            except Exception as exc:  # noqa: BLE001 - one bad event must not hide the rest
                logger.exception("event seq_num=%s", event.get("seq_num"))
                self.note(f"event seq_num={event.get('seq_num')}: {type(exc).__name__}: {exc}")

    def _on_event(self, stream: ImageStream, event: dict) -> None:
        seq = int(event["seq_num"])
        key = (event["descriptor"], seq)
        if key in self._seen:
            self.note(f"event seq_num={seq} repeated in stream {stream.name!r}: the later "
                      "frame is ignored, the first one binned (a row per seq_num)")
            return
        self._seen.add(key)
        data = event.get("data") or {}
        positions = {m: as_float(data.get(m)) for m in self.motors}
        t = as_float(event.get("time", time.time()))
        md, geometry_error = self._frame_metadata(stream, event)
        frame = FrameRef(self.uid, seq, t, positions, metadata=md, error=geometry_error)
        image = stream.image_key
        if image in data:
            value = data[image]
            filled = (event.get("filled") or {}).get(image, True)
            if value is None:
                frame.error = frame.error or f"frame seq_num={seq}: image {image!r} is None in the event"
            elif isinstance(value, str) and filled is not True:
                frame.loader, frame.source = self._datum_loader(stream, event, value)
            else:
                try:  # a private copy: a detector may reuse its buffer for the next frame
                    frame.data = np.array(value, copy=True)
                except Exception as exc:  # noqa: BLE001
                    frame.error = (f"frame seq_num={seq}: image key {image!r} cannot be read "
                                   f"as an array ({type(value).__name__}: {exc})")
            self._emit(frame)
        elif key in self._datum_frames:
            frame.loader, frame.source = self._datum_frames.pop(key)
            self._emit(frame)
        else:
            self._waiting[key] = (t, positions, md)

    def stream_resource(self, doc: dict) -> None:
        self._stream_resources[doc["uid"]] = dict(doc)

    def stream_datum(self, doc: dict) -> None:
        stream = self.streams.get(doc.get("descriptor", ""))
        resource = self._stream_resources.get(doc.get("stream_resource", ""))
        if stream is None or resource is None or resource.get("data_key") != stream.image_key:
            return
        s0, s1 = int(doc["seq_nums"]["start"]), int(doc["seq_nums"]["stop"])
        i0 = int(doc["indices"]["start"])
        for seq in range(s0, s1):
            loader, source, path = self.readers.stream_frame(
                self.uid, stream.name, stream.image_key, resource, i0 + seq - s0, seq)
            if path is not None:
                self.paths.add(path)
            key = (doc["descriptor"], seq)
            waiting = self._waiting.pop(key, None)
            if waiting is None:
                self._datum_frames[key] = (loader, source)
            else:
                t, positions, md = waiting
                self._emit(FrameRef(self.uid, seq, t, positions, loader=loader, source=source,
                                    metadata=md))

    def resource(self, doc: dict) -> None:
        self._filler.resource(doc)

    def datum(self, doc: dict) -> None:
        self._filler.datum(doc)

    def datum_page(self, doc: dict) -> None:
        self._filler.datum_page(doc)

    def _datum_loader(self, stream: ImageStream, event: dict, datum_id: str
                      ) -> tuple[Callable[[], np.ndarray], str]:
        seq = int(event["seq_num"])
        tiled = self.readers.tiled(self.uid, stream.name, stream.image_key, seq)
        datum = self._datums.get(datum_id)
        resource = self._resources.get(datum["resource"]) if datum else None
        why = None
        if datum is None:
            why = "unknown datum"
        elif resource is None:
            why = "unknown resource"
        elif self.readers.read_from_tiled:
            why = "read_from_tiled"
        elif resource.get("spec") not in self.readers.handler_registry:
            why = f"no handler for spec {resource.get('spec')!r}"
        if why is not None:
            logger.debug("datum %s: %s; reading from Tiled", datum_id, why)
            return tiled, f"tiled ({why})"
        filler, image = self._filler, stream.image_key
        event = {**event, "data": {image: datum_id}, "filled": {image: False},
                 "timestamps": {image: (event.get("timestamps") or {}).get(image, 0.0)}}

        def load() -> np.ndarray:
            filled = filler.fill_event(event, include=[image], inplace=False)
            return np.asarray(filled["data"][image])

        return load, f"{resource['spec']} {resource['resource_path']} {datum['datum_kwargs']}"

    def stop(self, doc: dict) -> None:
        """Frames still unpaired: a frame whose event never came (fly scans) with NaN
        positions; an event whose frame never came with the reason."""
        self.stop_doc = dict(doc)
        t_stop = as_float(doc.get("time", time.time()))
        for (desc, seq), (loader, source) in sorted(self._datum_frames.items(),
                                                    key=lambda kv: kv[0][1]):
            stream = self.streams[desc]
            nan = {m: float("nan") for m in self.motors}
            md, err = self._frame_metadata(stream, {"seq_num": seq, "time": t_stop, "data": {}})
            self._emit(FrameRef(self.uid, seq, t_stop, nan, loader=loader, source=source,
                                metadata=md, error=err))
        for (desc, seq), (t, positions, md) in sorted(self._waiting.items(),
                                                      key=lambda kv: kv[0][1]):
            key = self.streams[desc].image_key
            self._emit(FrameRef(
                self.uid, seq, t, positions, source="event", metadata=md,
                error=f"frame seq_num={seq}: no frame data arrived for image key {key!r} by "
                      f"the stop document"))
        self._datum_frames.clear()
        self._waiting.clear()

    def release(self) -> None:
        """Close what this run opened (its files' read handles, the Filler's handlers)."""
        self.readers.release(self.paths)
        self._filler.close()
