;; The WASM benchmark's module: the JSON interface (memory64) doing a chosen amount of work.
;;
;; handle(msg, env) adds one to a counter in memory, spins $spin times (the
;; benchmark writes the number into this file's text before compiling it:
;; 0 for a call that costs only the interface, more for one that costs about
;; what an aos Eval does), and answers
;;   {"ok":true,"response":{"Output":{"data":"<count>"}}}
;; malloc is a bump allocator whose top lives in memory, as a C one's does.
(module
  (memory (export "memory") i64 4)
  (global $spin i64 (i64.const 0))
  (data (i64.const 0x08) "\00\00\01\00\00\00\00\00")  ;; heap top: 0x10000
  (data (i64.const 0x100) "{\"ok\":true,\"response\":{\"Output\":{\"data\":\"")
  (data (i64.const 0x140) "\"}}}")

  (func $malloc (export "malloc") (param $n i64) (result i64)
    (local $p i64) (local $end i64)
    (local.set $p (i64.load (i64.const 0x08)))
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
    (i64.store (i64.const 0x08) (local.get $end))
    (local.get $p))

  (func (export "handle") (param $msg i64) (param $env i64) (result i64)
    (local $n i64) (local $v i64) (local $p i64) (local $out i64) (local $len i64)
    (i64.store (i64.const 0x10) (i64.add (i64.load (i64.const 0x10)) (i64.const 1)))
    (local.set $n (global.get $spin))
    (block $done
      (loop $spinning
        (br_if $done (i64.eqz (local.get $n)))
        (local.set $n (i64.sub (local.get $n) (i64.const 1)))
        (br $spinning)))
    ;; the count in decimal, backwards from 0x1c0
    (local.set $v (i64.load (i64.const 0x10)))
    (local.set $p (i64.const 0x1c0))
    (loop $digit
      (local.set $p (i64.sub (local.get $p) (i64.const 1)))
      (i64.store8 (local.get $p) (i64.add (i64.const 48) (i64.rem_u (local.get $v) (i64.const 10))))
      (local.set $v (i64.div_u (local.get $v) (i64.const 10)))
      (br_if $digit (i64.ne (local.get $v) (i64.const 0))))
    (local.set $len (i64.sub (i64.const 0x1c0) (local.get $p)))
    (local.set $out (call $malloc (i64.add (local.get $len) (i64.const 64))))
    (memory.copy (local.get $out) (i64.const 0x100) (i64.const 41))
    (memory.copy (i64.add (local.get $out) (i64.const 41)) (local.get $p) (local.get $len))
    (memory.copy (i64.add (i64.add (local.get $out) (i64.const 41)) (local.get $len))
                 (i64.const 0x140) (i64.const 5))
    (local.get $out))
)
