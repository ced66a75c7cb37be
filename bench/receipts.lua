-- wrk script for `make bench`: POST realistic receipts, a fixed number per thread, each with a unique key.
--
-- Usage: wrk -t T -c C -d CAP -s bench/receipts.lua URL -- REQUESTS_PER_THREAD CONNS_PER_THREAD NONCE [count2xx]
--
-- wrk is duration-based; a fixed request count is built on its delay() hook, which wrk calls once per
-- connection before every request: while the thread's budget lasts delay() reserves one request and returns 0,
-- afterwards it parks the connection on a one-hour timer. When every connection of the thread is parked, all
-- of its responses are in: the thread stops its loop and says so on stderr. wrk's main thread only sleeps out
-- -d, so the harness (bench/wrkrun.py) sends SIGINT once every thread has said it is done.
--
-- The last line on stdout is `KKTD_BENCH {json}` with the exact counts and latency percentiles (microseconds).
-- With the optional 4th argument `count2xx` a response() hook counts 2xx answers; wrk then copies every
-- response's headers and body into Lua, which costs client CPU, so by default 2xx = completed - errors.status
-- (wrk counts status > 399 there; no 1xx/3xx are ever answered here).

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } kktd_bench_timespec;
int clock_gettime(int clock_id, kktd_bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local timespec = ffi.new("kktd_bench_timespec")

local function now_us()
   ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
   return tonumber(timespec.tv_sec) * 1000000 + math.floor(tonumber(timespec.tv_nsec) / 1000)
end

local PARK_MS = 3600000
local POOL_SIZE = 97 -- prime, so consecutive keys do not line up with pool slots across threads

-- Per-thread state (each wrk thread has its own Lua state; done() reads these through thread:get()).
budget, conns, nonce = 0, 0, "x"
reserved, issued, parked, ok2xx = 0, 0, 0, 0
count_mode = false
t_first, t_last = 0, 0
body_bytes_mean = 0
tid = 0

local threads = {} -- main state only: every thread, for done()

function setup(thread)
   thread:set("tid", #threads + 1)
   table.insert(threads, thread)
end

-- ---- realistic receipts (the schema of kktd/receipt.py) ----

local NAMES = {
   "Молоко 3,2% 1 л", "Хлеб бородинский", "Сыр российский 200 г", "Яйца С1 10 шт", "Кефир 1% 900 мл",
   "Масло сливочное 82,5%", "Гречка ядрица 900 г", "Сахар-песок 1 кг", "Чай чёрный листовой 100 г",
   "Кофе молотый 250 г", "Яблоки Голден, кг", "Бананы, кг", "Картофель молодой, кг", "Огурцы грунтовые, кг",
   "Колбаса докторская 400 г", "Пельмени сибирские 800 г", "Вода минеральная 1,5 л", "Сок яблочный 1 л",
   "Шоколад молочный 90 г", "Печенье овсяное 300 г", "Пакет-майка", "Зубная паста 100 мл",
   "Стиральный порошок 3 кг", "Доставка по городу", "Сметана 20% 300 г",
}
local QUANTITIES = { {"1.000", 1000}, {"1.000", 1000}, {"2.000", 2000}, {"3.000", 3000}, {"0.500", 500},
                     {"1.250", 1250}, {"0.356", 356}, {"0.875", 875} }
local VATS = { "vat20", "vat20", "vat10", "none", "vat0" }
local TAXATIONS = { "osn", "osn", "usn_income", "usn_income_outcome", "patent" }
local CASHIERS = { "Иванова А. П.", "Петров С. Н.", "Сидоренко Ю. В." }

local function pick(list)
   return list[math.random(#list)]
end

local function item_json(total_so_far)
   local name = pick(NAMES)
   local price = math.random(39, 4999) * 10 -- kopecks: 3.90 .. 499.90 roubles
   local quantity = pick(QUANTITIES)
   -- Half-up to the kopeck, as the validator computes it; all values are small integers, exact in a double.
   local sum = math.floor((price * quantity[2] + 500) / 1000)
   local object = (name == "Доставка по городу") and "service" or "commodity"
   local json = '{"name":"' .. name .. '","price":' .. price .. ',"quantity":"' .. quantity[1] ..
      '","sum":' .. sum .. ',"vat":"' .. pick(VATS) ..
      '","payment_method":"full_payment","payment_object":"' .. object .. '"}'
   return json, total_so_far + sum
end

local function payments_json(total)
   if total >= 300 and math.random(3) == 1 then
      -- Split payment: some cash, the rest by card; the parts add up to the kopeck.
      local cash = math.floor(total / 300) * 100
      return '[{"type":"cash","amount":' .. cash .. '},{"type":"electronic","amount":' .. (total - cash) .. '}]'
   end
   return '[{"type":"' .. ((math.random(4) == 1) and "cash" or "electronic") .. '","amount":' .. total .. '}]'
end

-- Everything after the idempotency key: `{"idempotency_key":"<key>"` .. tail
local function receipt_tail(pos_id)
   local items, total = {}, 0
   for i = 1, math.random(2, 5) do
      items[i], total = item_json(total)
   end
   local tail = ',"pos_id":"' .. pos_id .. '","operation":"sale","taxation":"' .. pick(TAXATIONS) ..
      '","items":[' .. table.concat(items, ",") .. '],"payments":' .. payments_json(total)
   if math.random(2) == 1 then
      tail = tail .. ',"cashier":{"name":"' .. pick(CASHIERS) .. '","inn":"771234567890"}'
   end
   if math.random(5) == 1 then
      tail = tail .. ',"customer_contact":"+79161234567"'
   end
   return tail .. "}"
end

local pool = {}
local headers = { ["Content-Type"] = "application/json" }

function init(args)
   budget = tonumber(args[1]) or error("argument 1: requests per thread")
   conns = tonumber(args[2]) or error("argument 2: connections per thread")
   nonce = args[3] or error("argument 3: run nonce")
   math.randomseed(tid * 7919 + 17)
   local pos_id = "POS-" .. string.format("%03d", tid)
   local bytes = 0
   for i = 1, POOL_SIZE do
      pool[i] = receipt_tail(pos_id)
      bytes = bytes + #pool[i]
   end
   -- The body is '{"idempotency_key":"' .. key .. '"' .. tail; keys are ~20 bytes.
   body_bytes_mean = bytes / POOL_SIZE + 41
   count_mode = (args[4] == "count2xx")
   if count_mode then
      response = function(status, _, _)
         if status >= 200 and status < 300 then
            ok2xx = ok2xx + 1
         end
      end
   end
end

function delay()
   if reserved < budget then
      reserved = reserved + 1
      return 0
   end
   parked = parked + 1
   if parked == conns then
      t_last = now_us()
      io.stderr:write("KKTD_THREAD_DONE " .. tid .. "\n")
      io.stderr:flush()
      wrk.thread:stop()
   end
   return PARK_MS
end

local function receipt_request(key, slot)
   local body = '{"idempotency_key":"' .. key .. '"' .. pool[slot % POOL_SIZE + 1]
   return wrk.format("POST", "/v1/kkt/receipt", headers, body)
end

function request()
   if reserved == 0 then
      -- wrk calls request() once before the threads start, to check it (script_verify_request); that
      -- request is never sent, so it is neither counted nor timed.
      return receipt_request(nonce .. "-verify", 0)
   end
   issued = issued + 1
   if issued == 1 then
      t_first = now_us()
   end
   -- Unique across runs (nonce), threads (tid) and requests (counter); fits [A-Za-z0-9._:-]{1,64}.
   return receipt_request(nonce .. "-" .. tid .. "-" .. issued, issued)
end

function done(summary, latency, _)
   local total_issued, total_ok, first, last = 0, 0, nil, 0
   for _, thread in ipairs(threads) do
      total_issued = total_issued + thread:get("issued")
      total_ok = total_ok + thread:get("ok2xx")
      local t0, t1 = thread:get("t_first"), thread:get("t_last")
      if t0 > 0 and (first == nil or t0 < first) then first = t0 end
      if t1 > last then last = t1 end
   end
   local e = summary.errors
   local counted = #threads > 0 and threads[1]:get("count_mode")
   local out = {
      '"threads":' .. #threads,
      '"issued":' .. total_issued,
      '"completed":' .. summary.requests,
      '"ok2xx":' .. (counted and total_ok or (summary.requests - e.status)),
      '"ok2xx_derived":' .. (summary.requests - e.status),
      '"ok2xx_counted_in_lua":' .. (counted and total_ok or "null"),
      '"wrk_runtime_us":' .. summary.duration,
      string.format('"body_bytes_mean":%.0f', #threads > 0 and threads[1]:get("body_bytes_mean") or 0),
      '"first_request_us":' .. (first or 0),
      '"last_response_us":' .. last,
      '"errors":{"connect":' .. e.connect .. ',"read":' .. e.read .. ',"write":' .. e.write ..
         ',"status":' .. e.status .. ',"timeout":' .. e.timeout .. '}',
      string.format('"latency_us":{"min":%d,"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d}',
         latency.min, latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
         latency:percentile(99), latency:percentile(99.9)),
   }
   io.write("KKTD_BENCH {" .. table.concat(out, ",") .. "}\n")
end
