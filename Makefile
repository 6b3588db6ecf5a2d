# lua-pglisten -- build, test and install.
#
#   make            the pglisten.core module and the lua-pglisten runner into build/
#   make test       install missing Debian packages, build, run every spec against
#                   a throwaway PostgreSQL, stop it, then luacheck; non-zero on any failure
#   make demo       the same set-up, then example 1 end to end under the runner
#                   (EXAMPLE=04: example 4, change data capture from the WAL)
#   make check      the specs with the C code built under ASan + UBSan
#   make bench      ../shared/bench with lua-pglisten beside the peers
#   make lint       luacheck over every Lua file of the tree (.luacheckrc)
#   make fuzz       the pgoutput decoder under libFuzzer + sanitizers (clang)
#   make install    into PREFIX (LuaRocks passes its own LUADIR/LIBDIR/BINDIR)
#
# Every variable can be overridden on the command line.  Flags come from
# pkg-config unless LuaRocks passes LUA_INCDIR / PQ_INCDIR / PQ_LIBDIR.

VERSION      = 0.1.0
LUA_VERSION ?= 5.4
LUA         ?= lua$(LUA_VERSION)
PKG_CONFIG  ?= pkg-config
LUA_PC      ?= lua$(LUA_VERSION)
BUSTED      ?= busted

CC      ?= cc
CFLAGS  ?= -O2 -g
LIBFLAG ?= -shared
WARN     = -std=c99 -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes
DEFS     = -D_POSIX_C_SOURCE=200809L -DPGL_VERSION='"$(VERSION)"'

ifneq ($(strip $(LUA_INCDIR)),)
LUA_CFLAGS ?= -I$(LUA_INCDIR)
else
LUA_CFLAGS ?= $(shell $(PKG_CONFIG) --cflags $(LUA_PC) 2>/dev/null || echo -I/usr/include/lua$(LUA_VERSION))
endif
LUA_LIBS ?= $(shell $(PKG_CONFIG) --libs $(LUA_PC) 2>/dev/null || echo -llua$(LUA_VERSION))

# LuaRocks finds libpq's library but not Debian's header directory
# (/usr/include/postgresql): use PQ_INCDIR when it holds the header, else
# pkg-config, else pg_config.
PQ_HEADER_DIR := $(firstword $(foreach d,$(PQ_INCDIR) $(PQ_INCDIR)/postgresql,$(if $(wildcard $(d)/libpq-fe.h),$(d))))
ifneq ($(PQ_HEADER_DIR),)
PQ_CFLAGS ?= -I$(PQ_HEADER_DIR)
else
PQ_CFLAGS ?= $(shell $(PKG_CONFIG) --cflags libpq 2>/dev/null || echo -I$$(pg_config --includedir))
endif
ifneq ($(strip $(PQ_LIBDIR)),)
PQ_LIBS ?= -L$(PQ_LIBDIR) -lpq
else
PQ_LIBS ?= $(shell $(PKG_CONFIG) --libs libpq 2>/dev/null || echo -lpq)
endif

# Install locations.  Under LuaRocks, PREFIX is the rock's own directory
# (TREE/lib/luarocks/rocks-5.4/NAME/VERSION) and the modules are deployed to
# TREE/share/lua/5.4 and TREE/lib/lua/5.4: the runner is built to look there.
PREFIX     ?= /usr/local
LUADIR     ?= $(PREFIX)/share/lua/$(LUA_VERSION)
LIBDIR     ?= $(PREFIX)/lib/lua/$(LUA_VERSION)
BINDIR     ?= $(PREFIX)/bin
MANDIR     ?= $(PREFIX)/share/man
ROCKS_TREE := $(shell printf '%s' '$(PREFIX)' | sed -n 's|/lib/luarocks/rocks[^/]*/.*$$||p')
ifneq ($(ROCKS_TREE),)
RUNTIME_LUADIR ?= $(ROCKS_TREE)/share/lua/$(LUA_VERSION)
RUNTIME_LIBDIR ?= $(ROCKS_TREE)/lib/lua/$(LUA_VERSION)
else
RUNTIME_LUADIR ?= $(LUADIR)
RUNTIME_LIBDIR ?= $(LIBDIR)
endif

BUILD   ?= build
SRC      = src/core.c src/idle.c src/conninfo.c src/sdnotify.c src/conn.c src/query.c src/stmtcache.c src/notify.c src/result.c src/number.c src/pipeline.c src/pipeline_send.c src/json.c src/jsondec.c src/repl.c src/replstream.c src/pgoutput.c src/pgoutput_rows.c
HDR      = src/pgl.h src/conn.h src/json.h src/repl.h src/pgoutput.h src/pipeline.h
LUASRC   = $(wildcard lua/pglisten/*.lua) $(wildcard lua/pglisten/*.sql)
LUASUBDIRS = sources services replication commands

MODULE        = $(BUILD)/pglisten/core.so
RUNNER        = $(BUILD)/lua-pglisten
RUNNER_INST   = $(BUILD)/install/lua-pglisten

DEV_LPATH = $(CURDIR)/lua/?.lua;$(CURDIR)/lua/?/init.lua
DEV_CPATH = $(CURDIR)/$(BUILD)/?.so
INST_LPATH = $(RUNTIME_LUADIR)/?.lua;$(RUNTIME_LUADIR)/?/init.lua
INST_CPATH = $(RUNTIME_LIBDIR)/?.so

.PHONY: all deps test demo check bench lint install clean FORCE

all: $(MODULE) $(RUNNER) $(RUNNER_INST)

$(MODULE): $(SRC) $(HDR) Makefile
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(WARN) $(DEFS) -fPIC -fvisibility=hidden $(LUA_CFLAGS) $(PQ_CFLAGS) \
	  $(LIBFLAG) -o $@ $(SRC) $(PQ_LIBS) -lm

$(RUNNER): src/main.c Makefile
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(WARN) $(DEFS) $(LUA_CFLAGS) \
	  -DPGL_LPATH='"$(DEV_LPATH)"' -DPGL_CPATH='"$(DEV_CPATH)"' \
	  -o $@ src/main.c -Wl,-E $(LUA_LIBS) -lm -ldl

# The installed runner has its module paths compiled in: rebuild it whenever
# they change (another PREFIX, another LuaRocks tree).
INST_STAMP = $(BUILD)/install/paths
$(INST_STAMP): FORCE
	@mkdir -p $(dir $@)
	@printf '%s\n%s\n' '$(INST_LPATH)' '$(INST_CPATH)' | cmp -s - $@ 2>/dev/null || \
	  printf '%s\n%s\n' '$(INST_LPATH)' '$(INST_CPATH)' >$@

$(RUNNER_INST): src/main.c Makefile $(INST_STAMP)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(WARN) $(DEFS) $(LUA_CFLAGS) \
	  -DPGL_LPATH='"$(INST_LPATH)"' -DPGL_CPATH='"$(INST_CPATH)"' \
	  -o $@ src/main.c -Wl,-E $(LUA_LIBS) -lm -ldl

deps:
	@scripts/deps.sh

# Sets up everything a fresh Debian 12 machine lacks, then runs every spec
# against PostgreSQL servers of its own.  SPEC=spec/01-core_spec.lua runs one
# file.  SHARDS busted processes at once, each with its own servers
# (scripts/shards.sh): most of the suite waits on servers, retries and
# runners, and two overlap those waits on two cores (9.6 min alone, 5.3 min
# in two).  SHARDS=1 runs them one after the other.
SPEC ?= spec
SHARDS ?= 2
test: deps
	@$(MAKE) --no-print-directory all
	@rc=0; scripts/shards.sh $(SHARDS) $(SPEC) || rc=1; \
	  echo "lint: luacheck $(LINT_DIRS)"; $(LUACHECK) --no-color -q $(LINT_DIRS) || rc=1; exit $$rc

demo: deps
	@$(MAKE) --no-print-directory all
	@scripts/with-pg.sh examples/demo.sh $(EXAMPLE)

# The C code under AddressSanitizer and UndefinedBehaviorSanitizer.  The Lua
# interpreter is not instrumented, so the sanitizer runtime is preloaded.
ASAN_FLAGS = -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
check: deps
	@$(MAKE) --no-print-directory BUILD=build-asan CFLAGS='$(ASAN_FLAGS)' \
	  LUA_LIBS='$(LUA_LIBS) -fsanitize=address,undefined' \
	  PQ_LIBS='$(PQ_LIBS) -fsanitize=address,undefined' all
	@PGL_BUILD=build-asan PGL_SANITIZE=1 scripts/shards.sh $(SHARDS) $(SPEC)

bench: deps
	@$(MAKE) --no-print-directory all
	@bench/bench.sh

# Every Lua file of the tree, with the settings of .luacheckrc (std = "lua54").
LUACHECK ?= luacheck
LINT_DIRS = lua spec examples bench
lint: deps
	@$(LUACHECK) --no-color -q $(LINT_DIRS)

install: all
	install -d $(DESTDIR)$(LUADIR)/pglisten $(DESTDIR)$(LIBDIR)/pglisten $(DESTDIR)$(BINDIR)
	install -m 644 $(LUASRC) $(DESTDIR)$(LUADIR)/pglisten/
	for d in $(LUASUBDIRS); do install -d $(DESTDIR)$(LUADIR)/pglisten/$$d && \
	  install -m 644 lua/pglisten/$$d/*.lua $(DESTDIR)$(LUADIR)/pglisten/$$d/ || exit 1; done
	install -m 755 $(MODULE) $(DESTDIR)$(LIBDIR)/pglisten/core.so
	install -m 755 $(RUNNER_INST) $(DESTDIR)$(BINDIR)/lua-pglisten
	install -d $(DESTDIR)$(MANDIR)/man1
	install -m 644 doc/lua-pglisten.1 $(DESTDIR)$(MANDIR)/man1/lua-pglisten.1

clean:
	rm -rf build build-asan

# make fuzz: under libFuzzer + ASan/UBSan (clang), FUZZ_TIME seconds each,
# the pgoutput decoder from the real messages in fuzz/corpus, then the JSON
# decoder and encoder (fuzz/json_fuzz.c) from fuzz/json_corpus with
# fuzz/json.dict.  New inputs are kept in $(BUILD)/fuzz/.
FUZZ_CC   ?= clang
FUZZ_TIME ?= 60
FUZZ_BIN   = $(BUILD)/fuzz/pgoutput_fuzz
FUZZ_JSON  = $(BUILD)/fuzz/json_fuzz
.PHONY: fuzz
fuzz: $(FUZZ_BIN) $(FUZZ_JSON)
	mkdir -p $(BUILD)/fuzz/corpus $(BUILD)/fuzz/json_corpus
	$(FUZZ_BIN) -max_total_time=$(FUZZ_TIME) -max_len=8192 -print_final_stats=1 $(BUILD)/fuzz/corpus fuzz/corpus
	$(FUZZ_JSON) -max_total_time=$(FUZZ_TIME) -max_len=8192 -print_final_stats=1 -dict=fuzz/json.dict \
	  $(BUILD)/fuzz/json_corpus fuzz/json_corpus
$(BUILD)/fuzz/%_fuzz: fuzz/%_fuzz.c $(filter-out src/main.c,$(SRC)) $(HDR)
	mkdir -p $(dir $@)
	$(FUZZ_CC) -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all $(DEFS) \
	  $(LUA_CFLAGS) $(PQ_CFLAGS) -o $@ $< $(filter-out src/main.c,$(SRC)) \
	  $(LUA_LIBS) $(PQ_LIBS) -lm
