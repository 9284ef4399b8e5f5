;; Reverses the input bytes: "hello" -> "olleh".
;;
;; Dispatch WebAssembly ABI: imports only from "env" (input_len, input_read, output_write),
;; exports "memory" and "run: () -> i32" (0 = success). Run it with:
;;   dispatch job submit --wasm examples/wasm/reverse.wat --input hello --wait
(module
  (import "env" "input_len" (func $input_len (result i32)))
  (import "env" "input_read" (func $input_read (param i32 i32) (result i32)))
  (import "env" "output_write" (func $output_write (param i32 i32)))
  (memory (export "memory") 1)

  (func (export "run") (result i32)
    (local $n i32)
    (local $i i32)
    (local $pages i32)
    (local.set $n (call $input_len))
    ;; The input goes at [0, n) and its reverse at [n, 2n): grow to enough 64 KiB pages.
    (local.set $pages
      (i32.shr_u (i32.add (i32.shl (local.get $n) (i32.const 1)) (i32.const 65535))
                 (i32.const 16)))
    (if (i32.gt_u (local.get $pages) (memory.size))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $pages) (memory.size))) (i32.const -1))
          (then (return (i32.const 1))))))
    ;; input_read copies min(len, unread bytes), so one call reads everything.
    (drop (call $input_read (i32.const 0) (local.get $n)))
    ;; out[i] = in[n - 1 - i]
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (i32.store8
          (i32.add (local.get $n) (local.get $i))
          (i32.load8_u (i32.sub (i32.sub (local.get $n) (i32.const 1)) (local.get $i))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (call $output_write (local.get $n) (local.get $n))
    (i32.const 0)))
