"""``whisper-batch transcribe FILE...``: local files in, ``DIR/<stem>.<format>`` out."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from batch_job.errors import WhisperBatchError
from batch_job.settings import Settings
from batch_job.speakers.options import SpeakerOptions, settings_from_arguments
from batch_job.speakers.options import add_arguments as add_speaker_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "transcribe",
        help="transcribe local audio files",
        description="Transcribe local audio files; writes DIR/<input stem>.<format> for each.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files (wav, flac, ogg, mp3; m4a/mp4/aac/webm need ffmpeg)")
    p.add_argument("--model", help="tiny.en (default), base, a transformers checkpoint or faster-whisper (CTranslate2) "
                                   "model directory, or a hub id cached locally")
    p.add_argument("--output-dir", default=".", help="where to write the transcripts (default: current directory)")
    p.add_argument("--formats", help="comma-separated subset of json,txt,srt,vtt (default: all)")
    p.add_argument("--batch-size", type=int, help="windows per batch (default: 8)")
    p.add_argument("--language", help="language code (multilingual models; default: detect)")
    p.add_argument("--task", choices=("transcribe", "translate"), default="transcribe")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "neuron"), help="default: auto")
    p.add_argument("--threads", type=int, help="torch threads (default: all available cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    words = p.add_argument_group("word timestamps and subtitles")
    words.add_argument("--word-timestamps", action="store_true", default=None,
                       help="time every word (JSON segments[].words; SRT/VTT cues split at word times)")
    words.add_argument("--max-line-width", type=int, help="SRT/VTT: characters per line (default: 42)")
    words.add_argument("--max-line-count", type=int, help="SRT/VTT: lines per cue (default: 2)")
    words.add_argument("--max-cue-seconds", type=float, help="SRT/VTT: longest cue where word times allow (default: 7)")
    words.add_argument("--word-level-vtt", action="store_true", default=None,
                       help="VTT: a timestamp tag before each word (implies --word-timestamps)")
    add_speaker_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Transcribe every file; a bad file prints one line and makes the exit status 1."""
    from batch_job.subtitles import CueOptions
    from batch_job.writers import FORMATS, write_outputs

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    settings = Settings.from_env().replace(
        model=args.model, formats=args.formats, batch_size=args.batch_size, device=args.device, threads=args.threads,
        word_timestamps=args.word_timestamps or args.word_level_vtt, max_line_width=args.max_line_width,
        max_line_count=args.max_line_count, max_cue_seconds=args.max_cue_seconds, vtt_word_level=args.word_level_vtt,
        **settings_from_arguments(args),
    )
    formats = settings.format_list
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        print(f"error: unknown format(s) {', '.join(unknown) or '(none)'}; choose from {','.join(FORMATS)}", file=sys.stderr)
        return 2
    if settings.batch_size < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        cue_options = CueOptions.from_settings(settings)
        SpeakerOptions.from_settings(settings)
    except (ValueError, WhisperBatchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    from batch_job.transcribe import Transcriber

    try:
        transcriber = Transcriber.load(settings)
    except WhisperBatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stems = _unique_stems([Path(f) for f in args.files])
    failures = 0
    t0 = time.perf_counter()
    audio_seconds = 0.0
    try:
        results = transcriber.transcribe_many(
            ((f, f) for f in args.files), language=args.language, task=args.task, progress=not args.no_progress
        )
        for result in results:
            if result.error is not None:
                failures += 1
                reason = getattr(result.error, "reason", type(result.error).__name__)
                print(f"{result.name}: error [{reason}]: {result.error}", file=sys.stderr)
                continue
            assert result.transcript is not None
            audio_seconds += result.transcript.duration
            written = write_outputs(result.transcript, out_dir, stems[result.name], formats, cue_options=cue_options)
            print(f"{result.name}: {result.transcript.duration:.1f} s -> {', '.join(str(p) for p in written)}")
    except ValueError as exc:  # bad --language / --task for this model
        print(f"error: {exc}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    if audio_seconds:
        print(f"done: {audio_seconds:.1f} s of audio in {wall:.1f} s ({audio_seconds / wall:.1f}x real time)", file=sys.stderr)
    return 1 if failures else 0


def _unique_stems(paths: list[Path]) -> dict[str, str]:
    """Output stem per input; inputs sharing a stem (a/x.wav, b/x.mp3) get -2, -3, ... suffixes."""
    seen: dict[str, int] = {}
    stems: dict[str, str] = {}
    for p in paths:
        stem = p.stem
        n = seen.get(stem, 0) + 1
        seen[stem] = n
        stems[str(p)] = stem if n == 1 else f"{stem}-{n}"
    return stems
