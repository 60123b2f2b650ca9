;; A JSON-interface module (memory64) that keeps its state in linear memory.
;;
;; handle(msg, env) counts its calls twice: in memory (at 0x08) and in the
;; exported mutable global "calls", and answers
;;   {"ok":true,"response":{"Output":{"data":{"count":N,"calls":N}},...}}
;; A marker anywhere in the message's JSON changes what it does, after
;; counting (so a failing call has changed the memory first):
;;   @trap   executes unreachable          @loop   never returns
;;   @hog    grows memory until refused, then answers ok:false "out of memory"
;;   @error  answers an aos-style Error    @fail   answers ok:false
;;   @print  writes a line to stdout through fd_write
;;   @slow   spins 2**28 times first (about a tenth of a second)
;; malloc is a bump allocator whose top lives in memory (at 0x10), as a C
;; allocator's does; the only other mutable global is a stack pointer that is
;; back at its value when a call returns (but not when it traps).
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i64 i64 i64) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get"
    (func $clock_time_get (param i32 i64 i64) (result i32)))
  (import "env" "never_called" (func $never_called (param i64 f64) (result f32)))

  (memory (export "memory") i64 2)
  (global $calls (export "calls") (mut i64) (i64.const 0))
  (global $sp (mut i64) (i64.const 0x8000))

  (data (i64.const 0x10) "\00\00\01\00\00\00\00\00")  ;; heap top: 0x10000
  (data (i64.const 0x100) "{\"ok\":true,\"response\":{\"Output\":{\"data\":{\"count\":")
  (data (i64.const 0x140) ",\"calls\":")
  (data (i64.const 0x150) "}},\"Messages\":[],\"Spawns\":[],\"Assignments\":[]}}")
  (data (i64.const 0x190) "{\"ok\":true,\"response\":{\"Error\":\"error on purpose\"}}\00")
  (data (i64.const 0x1d0) "{\"ok\":false,\"response\":\"failed on purpose\"}\00")
  (data (i64.const 0x200) "{\"ok\":false,\"response\":\"out of memory\"}\00")
  (data (i64.const 0x230) "hello from fd_write\n")
  (data (i64.const 0x250) "@trap")
  (data (i64.const 0x258) "@loop")
  (data (i64.const 0x260) "@hog")
  (data (i64.const 0x268) "@error")
  (data (i64.const 0x270) "@fail")
  (data (i64.const 0x278) "@print")
  (data (i64.const 0x280) "@slow")

  (func $malloc (export "malloc") (param $n i64) (result i64)
    (local $p i64) (local $end i64)
    (local.set $p (i64.load (i64.const 0x10)))
    (local.set $end
      (i64.and (i64.add (i64.add (local.get $p) (local.get $n)) (i64.const 7)) (i64.const -8)))
    (if (i64.gt_u (local.get $end) (i64.shl (memory.size) (i64.const 16)))
      (then
        (if (i64.eq
              (memory.grow
                (i64.sub
                  (i64.shr_u (i64.add (local.get $end) (i64.const 0xffff)) (i64.const 16))
                  (memory.size)))
              (i64.const -1))
          (then (return (i64.const 0))))))
    (i64.store (i64.const 0x10) (local.get $end))
    (local.get $p))

  (func $emscripten_stack_get_current (export "emscripten_stack_get_current") (result i64)
    (global.get $sp))
  (func $emscripten_stack_restore (export "_emscripten_stack_restore") (param $v i64)
    (global.set $sp (local.get $v)))

  ;; Whether the NUL-terminated string at $hay contains the $len bytes at $needle.
  (func $find (param $hay i64) (param $needle i64) (param $len i64) (result i32)
    (local $i i64)
    (block $no
      (loop $next
        (br_if $no (i32.eqz (i32.load8_u (local.get $hay))))
        (local.set $i (i64.const 0))
        (block $differs
          (loop $cmp
            (if (i64.eq (local.get $i) (local.get $len)) (then (return (i32.const 1))))
            (br_if $differs
              (i32.ne
                (i32.load8_u (i64.add (local.get $hay) (local.get $i)))
                (i32.load8_u (i64.add (local.get $needle) (local.get $i)))))
            (local.set $i (i64.add (local.get $i) (i64.const 1)))
            (br $cmp)))
        (local.set $hay (i64.add (local.get $hay) (i64.const 1)))
        (br $next)))
    (i32.const 0))

  (func $emit (param $cur i64) (param $src i64) (param $len i64) (result i64)
    (memory.copy (local.get $cur) (local.get $src) (local.get $len))
    (i64.add (local.get $cur) (local.get $len)))

  ;; Writes $v in decimal at $cur; returns the position after it.
  (func $itoa (param $cur i64) (param $v i64) (result i64)
    (local $p i64)
    (local.set $p (i64.const 0x340))
    (loop $digit
      (local.set $p (i64.sub (local.get $p) (i64.const 1)))
      (i64.store8 (local.get $p) (i64.add (i64.const 48) (i64.rem_u (local.get $v) (i64.const 10))))
      (local.set $v (i64.div_u (local.get $v) (i64.const 10)))
      (br_if $digit (i64.ne (local.get $v) (i64.const 0))))
    (call $emit (local.get $cur) (local.get $p) (i64.sub (i64.const 0x340) (local.get $p))))

  (func (export "handle") (param $msg i64) (param $env i64) (result i64)
    (local $out i64) (local $cur i64) (local $spin i64)
    (global.set $calls (i64.add (global.get $calls) (i64.const 1)))
    (i64.store (i64.const 0x08) (i64.add (i64.load (i64.const 0x08)) (i64.const 1)))
    (global.set $sp (i64.sub (global.get $sp) (i64.const 16)))
    (if (call $find (local.get $msg) (i64.const 0x280) (i64.const 5))
      (then
        (local.set $spin (i64.const 0x10000000))
        (loop $spinning
          (local.set $spin (i64.sub (local.get $spin) (i64.const 1)))
          (br_if $spinning (i64.ne (local.get $spin) (i64.const 0))))))
    (if (call $find (local.get $msg) (i64.const 0x250) (i64.const 5)) (then unreachable))
    (if (call $find (local.get $msg) (i64.const 0x258) (i64.const 5))
      (then (loop $forever (br $forever))))
    (if (call $find (local.get $msg) (i64.const 0x260) (i64.const 4))
      (then
        (loop $grow (br_if $grow (i64.ne (memory.grow (i64.const 16)) (i64.const -1))))
        (global.set $sp (i64.add (global.get $sp) (i64.const 16)))
        (return (i64.const 0x200))))
    (global.set $sp (i64.add (global.get $sp) (i64.const 16)))
    (if (call $find (local.get $msg) (i64.const 0x268) (i64.const 6))
      (then (return (i64.const 0x190))))
    (if (call $find (local.get $msg) (i64.const 0x270) (i64.const 5))
      (then (return (i64.const 0x1d0))))
    (if (call $find (local.get $msg) (i64.const 0x278) (i64.const 6))
      (then
        (i64.store (i64.const 0x300) (i64.const 0x230))
        (i64.store (i64.const 0x308) (i64.const 20))
        (drop (call $fd_write (i32.const 1) (i64.const 0x300) (i64.const 1) (i64.const 0x310)))))
    (local.set $out (call $malloc (i64.const 160)))
    (local.set $cur (call $emit (local.get $out) (i64.const 0x100) (i64.const 49)))
    (local.set $cur (call $itoa (local.get $cur) (i64.load (i64.const 0x08))))
    (local.set $cur (call $emit (local.get $cur) (i64.const 0x140) (i64.const 9)))
    (local.set $cur (call $itoa (local.get $cur) (global.get $calls)))
    (local.set $cur (call $emit (local.get $cur) (i64.const 0x150) (i64.const 47)))
    (i32.store8 (local.get $cur) (i32.const 0))
    (local.get $out))
)
