-- Argo CD health check for a trellis.dev/TrafficPolicy, against the Trellis condition contract: every
-- condition carries observedGeneration, and Ready summarises the others at that generation.
--   Progressing  until the operator has observed metadata.generation (status.observedGeneration
--                and every condition's observedGeneration), while a rollout runs
--                (RolloutProgressing True or status.rollout.state Progressing), or while Ready is
--                missing, Unknown or False for a reason that means "not yet" (Pending).
--   Degraded     when Degraded is True, or Ready is False for any other reason, with the failing
--                condition's message.
--   Healthy      only when Ready is True at the current generation.
-- Only the Lua base and table libraries are used, so the same text works as Argo CD's
-- resource_customizations/trellis.dev/TrafficPolicy/health.lua and pasted into argocd-cm
-- (resource.customizations.health.trellis.dev_TrafficPolicy).
local hs = {}
local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local status = obj.status
if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Trellis operator to report status"
  return hs
end

local function lags(observed)
  return generation ~= nil and observed ~= nil and observed < generation
end

if lags(status.observedGeneration) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

local byType = {}
for _, c in ipairs(status.conditions) do
  if c.type ~= nil then
    if lags(c.observedGeneration) then
      hs.status = "Progressing"
      hs.message = "Waiting for the operator to observe generation " .. generation ..
        " (" .. c.type .. " is at " .. c.observedGeneration .. ")"
      return hs
    end
    byType[c.type] = c
  end
end

-- "Reason: message", or whichever of the two is set.
local function describe(reason, message)
  if reason ~= nil and reason ~= "" and message ~= nil and message ~= "" then
    return reason .. ": " .. message
  end
  if message ~= nil and message ~= "" then
    return message
  end
  return reason
end

local rolling = byType["RolloutProgressing"]
if rolling ~= nil and rolling.status == "True" then
  hs.status = "Progressing"
  hs.message = describe("Rolling out", rolling.message)
  return hs
end
if status.rollout ~= nil and status.rollout.state == "Progressing" then
  hs.status = "Progressing"
  hs.message = describe("Rolling out", status.rollout.message)
  return hs
end

local degraded = byType["Degraded"]
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded.reason, degraded.message)
  return hs
end

local ready = byType["Ready"]
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end
if ready.status == "True" then
  hs.status = "Healthy"
  if ready.message ~= nil and ready.message ~= "" then
    hs.message = ready.message
  end
  return hs
end

-- Reasons of a not-True Ready that mean "not yet" rather than "broken".
local pending = {Pending = true, Progressing = true, Reconciling = true}
if ready.status ~= "False" or pending[ready.reason] then
  hs.status = "Progressing"
  hs.message = describe(ready.reason, ready.message)
  return hs
end

-- Ready carries the failing condition's reason; its message may live on that condition.
local message = ready.message
if message == nil or message == "" then
  for _, c in ipairs(status.conditions) do
    if c.type ~= "Ready" and c.status == "False" and c.reason == ready.reason and
        c.message ~= nil and c.message ~= "" then
      message = c.message
      break
    end
  end
end
hs.status = "Degraded"
hs.message = describe(ready.reason, message)
return hs
