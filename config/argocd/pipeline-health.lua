-- Argo CD health check for keystone.dev/Pipeline.
-- Healthy: the operator has observed the current generation and Ready=True.
-- Degraded: the spec is invalid, or the pipeline is Degraded/Invalid (a topic
-- conflict, a refused partition decrease, a failed upgrade, failing instances).
-- Progressing: anything else (not yet observed, provisioning, rolling out, upgrading).
local hs = {}

local function find(conditions, type)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe the pipeline"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local contracts = find(status.conditions, "ContractsValid")
if contracts ~= nil and contracts.status == "False" then
  hs.status = "Degraded"
  hs.message = "Invalid pipeline: " .. (contracts.message or contracts.reason or "")
  return hs
end

local ready = find(status.conditions, "Ready")
local applied = find(status.conditions, "SpecApplied")
if status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "Suspended"
  return hs
end

-- An upgrade or rollback under way: not healthy yet, not failed.
if status.phase == "Upgrading" then
  hs.status = "Progressing"
  if applied ~= nil and applied.message ~= nil then
    hs.message = applied.message
  else
    hs.message = "Upgrading"
  end
  return hs
end

-- Before Ready: a rolled-back or refused upgrade leaves the old version
-- running and ready, but the desired spec is not what runs.
if status.phase == "Degraded" or status.phase == "Invalid" then
  hs.status = "Degraded"
  if applied ~= nil and applied.status == "False" then
    hs.message = (applied.reason or "") .. ": " .. (applied.message or "")
  elseif ready ~= nil then
    hs.message = (ready.reason or "") .. ": " .. (ready.message or "")
  else
    hs.message = status.phase
  end
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Running"
  return hs
end

hs.status = "Progressing"
if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
  hs.message = ready.message
else
  hs.message = status.phase or "Progressing"
end
return hs
