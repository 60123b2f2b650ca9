;; A JSON-interface module (memory64) that answers with what it was given:
;;   {"ok":true,"response":{"Output":{"data":MSG},"Messages":[MSG],"Spawns":[ENV],"Assignments":[]}}
;; where MSG and ENV are the two JSON documents the host wrote, copied verbatim.
(module
  (memory (export "memory") i64 1)
  (data (i64.const 0x08) "\00\00\01\00\00\00\00\00")  ;; heap top: 0x10000
  (data (i64.const 0x100) "{\"ok\":true,\"response\":{\"Output\":{\"data\":")
  (data (i64.const 0x140) "},\"Messages\":[")
  (data (i64.const 0x150) "],\"Spawns\":[")
  (data (i64.const 0x160) "],\"Assignments\":[]}}")

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

  (func $strlen (param $p i64) (result i64)
    (local $n i64)
    (block $end
      (loop $next
        (br_if $end (i32.eqz (i32.load8_u (i64.add (local.get $p) (local.get $n)))))
        (local.set $n (i64.add (local.get $n) (i64.const 1)))
        (br $next)))
    (local.get $n))

  (func $emit (param $cur i64) (param $src i64) (param $len i64) (result i64)
    (memory.copy (local.get $cur) (local.get $src) (local.get $len))
    (i64.add (local.get $cur) (local.get $len)))

  (func (export "handle") (param $msg i64) (param $env i64) (result i64)
    (local $m i64) (local $e i64) (local $out i64) (local $cur i64)
    (local.set $m (call $strlen (local.get $msg)))
    (local.set $e (call $strlen (local.get $env)))
    (local.set $out
      (call $malloc (i64.add (i64.add (i64.shl (local.get $m) (i64.const 1)) (local.get $e))
                             (i64.const 128))))
    (if (i64.eqz (local.get $out)) (then unreachable))
    (local.set $cur (call $emit (local.get $out) (i64.const 0x100) (i64.const 40)))
    (local.set $cur (call $emit (local.get $cur) (local.get $msg) (local.get $m)))
    (local.set $cur (call $emit (local.get $cur) (i64.const 0x140) (i64.const 14)))
    (local.set $cur (call $emit (local.get $cur) (local.get $msg) (local.get $m)))
    (local.set $cur (call $emit (local.get $cur) (i64.const 0x150) (i64.const 12)))
    (local.set $cur (call $emit (local.get $cur) (local.get $env) (local.get $e)))
    (local.set $cur (call $emit (local.get $cur) (i64.const 0x160) (i64.const 20)))
    (i32.store8 (local.get $cur) (i32.const 0))
    (local.get $out))
)
