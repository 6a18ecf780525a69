# Two entry points for a fresh machine: `make demo` and `make test`. Each installs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean ffmpeg-libs

# torchcodec (`vidshift extract --decoder torchcodec`) links the system's shared FFmpeg libraries (4 to 9:
# libavcodec 58-63); decord bundles its own. Installed with apt-get when missing and we may (root, Debian/Ubuntu;
# these names are Debian 12's FFmpeg 5.1), else named; without them only the torchcodec tests skip.
FFMPEG_DEBS := libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavdevice59 libavfilter8
ffmpeg-libs:
	@if /sbin/ldconfig -p 2>/dev/null | grep -Eq 'libavcodec\.so\.(58|59|60|61|62|63) '; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing FFmpeg's shared libraries for torchcodec: $(FFMPEG_DEBS)"; \
		apt-get install -y -qq --no-install-recommends $(FFMPEG_DEBS) >/dev/null \
		|| { apt-get update -qq && apt-get install -y -qq --no-install-recommends $(FFMPEG_DEBS) >/dev/null; } \
		|| echo "note: apt-get could not install $(FFMPEG_DEBS); --decoder torchcodec needs FFmpeg 4-9's libraries"; \
	else \
		echo "note: --decoder torchcodec needs FFmpeg's shared libraries (libavcodec, libavformat, libavutil,"; \
		echo "      libswscale, libswresample, libavdevice, libavfilter of FFmpeg 4-9), e.g. as root on Debian 12:"; \
		echo "      apt-get install $(FFMPEG_DEBS)"; \
	fi

$(STAMP): setup.cfg pyproject.toml constraints.txt | ffmpeg-libs
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: ffmpeg-libs $(STAMP)

demo: ffmpeg-libs $(STAMP)
	$(BIN)/vidshift demo --out demo_out

test: ffmpeg-libs $(STAMP)
	$(BIN)/python -m pytest -q tests

# Both benchmarks at sizes a laptop CPU finishes in a few minutes; on a GPU node run them without options
# (benchmarks/README.md). They print tables and assert nothing.
bench: $(STAMP)
	$(BIN)/python benchmarks/extract.py --videos 4 --frames-per-video 32
	$(BIN)/python benchmarks/train.py --scale 0.25 --arrays pooled

clean:
	rm -rf $(VENV) demo_out
